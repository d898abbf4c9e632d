package main

// A MessagePack encoder for the values a decoded plugin config holds, shaped as go-cty's
// msgpack package shapes them for Nomad's SetConfig: an object is a map with its attribute
// names in sorted order, a whole number is an integer, other numbers are float64, a null
// attribute is nil.

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"sort"
)

func encodeMsgpack(value interface{}) ([]byte, error) {
	var out []byte
	err := appendMsgpack(&out, value)
	return out, err
}

func appendMsgpack(out *[]byte, value interface{}) error {
	switch v := value.(type) {
	case nil:
		*out = append(*out, 0xc0)
	case bool:
		if v {
			*out = append(*out, 0xc3)
		} else {
			*out = append(*out, 0xc2)
		}
	case json.Number:
		if i, err := v.Int64(); err == nil {
			appendInt(out, i)
			return nil
		}
		f, err := v.Float64()
		if err != nil {
			return fmt.Errorf("not a number: %q", v)
		}
		appendFloat(out, f)
	case int64:
		appendInt(out, v)
	case int:
		appendInt(out, int64(v))
	case float64:
		if v == math.Trunc(v) && math.Abs(v) < 1<<53 {
			appendInt(out, int64(v))
		} else {
			appendFloat(out, v)
		}
	case string:
		appendHeader(out, len(v), 0xa0, 32, 0xd9, 0xda, 0xdb)
		*out = append(*out, v...)
	case []interface{}:
		appendHeader(out, len(v), 0x90, 16, 0, 0xdc, 0xdd)
		for _, item := range v {
			if err := appendMsgpack(out, item); err != nil {
				return err
			}
		}
	case map[string]interface{}:
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		appendHeader(out, len(keys), 0x80, 16, 0, 0xde, 0xdf)
		for _, k := range keys {
			if err := appendMsgpack(out, k); err != nil {
				return err
			}
			if err := appendMsgpack(out, v[k]); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("cannot encode %T as msgpack", value)
	}
	return nil
}

// appendHeader writes a length prefix: the fix form below fixLimit, else the 8-bit form (when
// the type has one), the 16-bit or the 32-bit form.
func appendHeader(out *[]byte, n int, fix byte, fixLimit int, b8, b16, b32 byte) {
	switch {
	case n < fixLimit:
		*out = append(*out, fix|byte(n))
	case b8 != 0 && n <= math.MaxUint8:
		*out = append(*out, b8, byte(n))
	case n <= math.MaxUint16:
		*out = append(*out, b16, 0, 0)
		binary.BigEndian.PutUint16((*out)[len(*out)-2:], uint16(n))
	default:
		*out = append(*out, b32, 0, 0, 0, 0)
		binary.BigEndian.PutUint32((*out)[len(*out)-4:], uint32(n))
	}
}

func appendInt(out *[]byte, i int64) {
	switch {
	case i >= 0 && i <= 127:
		*out = append(*out, byte(i))
	case i < 0 && i >= -32:
		*out = append(*out, byte(int8(i)))
	default:
		*out = append(*out, 0xd3, 0, 0, 0, 0, 0, 0, 0, 0)
		binary.BigEndian.PutUint64((*out)[len(*out)-8:], uint64(i))
	}
}

func appendFloat(out *[]byte, f float64) {
	*out = append(*out, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0)
	binary.BigEndian.PutUint64((*out)[len(*out)-8:], math.Float64bits(f))
}
