package main

// Applying a plugin's config schema to a config, as the Nomad client does before SetConfig
// (it decodes the HCL `config` block with the hclspec the plugin returned, then encodes the
// result with go-cty's msgpack). Nomad uses HCL's own decoder; this host has no HCL, so it
// covers the spec kinds a device plugin's schema uses (Object, Attr, Default, Literal, Block)
// and JSON-shaped configs, with the same outcomes: unknown or missing-required arguments and
// values of the wrong type are refused before the plugin sees them, absent attributes are
// null or their Default, and every attribute of an Object is present in the result.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"

	hclspecpb "hotplugmonitor/nomadpb/hclspec"
)

func decodeConfig(spec *hclspecpb.Spec, config map[string]interface{}) (interface{}, error) {
	used := map[string]bool{}
	value, err := decodeSpec(spec, "", config, used)
	if err != nil {
		return nil, err
	}
	var unknown []string
	for k := range config {
		if !used[k] {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return nil, fmt.Errorf("Unsupported argument: an argument named %q is not expected here", unknown[0])
	}
	return value, nil
}

// decodeSpec evaluates one spec against a body; name is the label an enclosing Object gave it.
func decodeSpec(spec *hclspecpb.Spec, name string, body map[string]interface{}, used map[string]bool) (interface{}, error) {
	switch s := spec.GetBlock().(type) {
	case *hclspecpb.Spec_Object:
		out := map[string]interface{}{}
		for attr, sub := range s.Object.GetAttributes() {
			v, err := decodeSpec(sub, attr, body, used)
			if err != nil {
				return nil, err
			}
			out[attr] = v
		}
		return out, nil
	case *hclspecpb.Spec_Attr:
		key := s.Attr.GetName()
		if key == "" {
			key = name
		}
		raw, ok := body[key]
		used[key] = true
		if !ok || raw == nil {
			if s.Attr.GetRequired() {
				return nil, fmt.Errorf("Missing required argument: the argument %q is required", key)
			}
			return nil, nil
		}
		v, err := convert(raw, s.Attr.GetType())
		if err != nil {
			return nil, fmt.Errorf("Incorrect attribute value type: %q: %v", key, err)
		}
		return v, nil
	case *hclspecpb.Spec_Default:
		v, err := decodeSpec(s.Default.GetPrimary(), name, body, used)
		if err != nil || v != nil {
			return v, err
		}
		return decodeSpec(s.Default.GetDefault(), name, body, used)
	case *hclspecpb.Spec_Literal:
		// HCL literals such as true, 5, "1m" and [] read the same as JSON.
		dec := json.NewDecoder(strings.NewReader(s.Literal.GetValue()))
		dec.UseNumber()
		var v interface{}
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("literal %q: this host reads only JSON-shaped literals", s.Literal.GetValue())
		}
		return v, nil
	case *hclspecpb.Spec_BlockValue:
		key := s.BlockValue.GetName()
		if key == "" {
			key = name
		}
		raw, ok := body[key]
		used[key] = true
		if !ok {
			if s.BlockValue.GetRequired() {
				return nil, fmt.Errorf("Missing %s block: a block of type %q is required here", key, key)
			}
			return nil, nil
		}
		inner, ok := raw.(map[string]interface{})
		if !ok {
			return nil, fmt.Errorf("Unsupported argument: %q must be a block", key)
		}
		return decodeConfig(s.BlockValue.GetNested(), inner)
	default:
		return nil, fmt.Errorf("spec kind %T is not supported by this test host", spec.GetBlock())
	}
}

// convert applies an HCL type expression with cty's conversions (numbers and bools become
// strings, numeric and boolean strings become numbers and bools).
func convert(v interface{}, typ string) (interface{}, error) {
	typ = strings.ReplaceAll(typ, " ", "")
	switch {
	case typ == "" || typ == "any":
		return v, nil
	case typ == "string":
		switch x := v.(type) {
		case string:
			return x, nil
		case json.Number:
			return x.String(), nil
		case bool:
			return strconv.FormatBool(x), nil
		}
		return nil, fmt.Errorf("string required")
	case typ == "number":
		switch x := v.(type) {
		case json.Number:
			return x, nil
		case string:
			if _, err := strconv.ParseFloat(x, 64); err == nil {
				return json.Number(x), nil
			}
		}
		return nil, fmt.Errorf("number required")
	case typ == "bool":
		switch x := v.(type) {
		case bool:
			return x, nil
		case string:
			if b, err := strconv.ParseBool(x); err == nil && (x == "true" || x == "false") {
				return b, nil
			}
		}
		return nil, fmt.Errorf("bool required")
	case strings.HasPrefix(typ, "list(") || strings.HasPrefix(typ, "set("):
		inner := typ[strings.Index(typ, "(")+1 : len(typ)-1]
		items, ok := v.([]interface{})
		if !ok {
			return nil, fmt.Errorf("%s required", typ)
		}
		out := make([]interface{}, 0, len(items))
		for i, item := range items {
			c, err := convert(item, inner)
			if err != nil {
				return nil, fmt.Errorf("element %d: %v", i, err)
			}
			out = append(out, c)
		}
		return out, nil
	case strings.HasPrefix(typ, "map("):
		inner := typ[len("map(") : len(typ)-1]
		items, ok := v.(map[string]interface{})
		if !ok {
			return nil, fmt.Errorf("%s required", typ)
		}
		out := map[string]interface{}{}
		for k, item := range items {
			c, err := convert(item, inner)
			if err != nil {
				return nil, fmt.Errorf("element %q: %v", k, err)
			}
			out[k] = c
		}
		return out, nil
	}
	return nil, fmt.Errorf("type %q is not supported by this test host", typ)
}

// parseJSONObject reads a JSON object keeping numbers exact.
func parseJSONObject(raw json.RawMessage) (map[string]interface{}, error) {
	if len(bytes.TrimSpace(raw)) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return map[string]interface{}{}, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var out map[string]interface{}
	if err := dec.Decode(&out); err != nil {
		return nil, fmt.Errorf("config must be a JSON object: %v", err)
	}
	return out, nil
}
