// Command host launches a Nomad device plugin through go-plugin's real client, the way the
// Nomad client's plugin loader does, and calls it through stubs generated from our protos.
//
// It reads one JSON command per line on stdin and writes one JSON result per line on stdout
// (see tests/nomad/host.py for the commands). Errors are {"error": ..., "code": ...} with
// the gRPC status code name where there is one. go-plugin's own logging, including the
// plugin's stderr lines it re-logs at their levels, is kept and returned by "logs".
//
// The launch sequence follows Nomad's helper/pluginutils/loader (read there as facts): a
// first launch that dispenses "base" and asks PluginInfo and ConfigSchema, then Kill; if the
// plugin has a schema, a second launch that dispenses "device", calls SetConfig twice (once
// inside Dispense, once to validate) without agent config, then Kill; then the long-lived
// launch, whose SetConfig carries the agent's config, and on which Fingerprint, Reserve and
// Stats are called.
package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	hclog "github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	basepb "hotplugmonitor/nomadpb/base"
	devicepb "hotplugmonitor/nomadpb/device"
	hclspecpb "hotplugmonitor/nomadpb/hclspec"
)

// Facts from Nomad's plugins/base (Handshake, plugin type names) and plugins/device
// (ApiVersion010), and its client config defaults for the plugin port range.
var handshake = plugin.HandshakeConfig{
	ProtocolVersion:  2,
	MagicCookieKey:   "NOMAD_PLUGIN_MAGIC_COOKIE",
	MagicCookieValue: "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255",
}

const (
	pluginTypeBase   = "base"
	pluginTypeDevice = "device"
	deviceAPIVersion = "v0.1.0"
	clientMinPort    = 14000
	clientMaxPort    = 14512
	rpcTimeout       = 10 * time.Second
)

// Close to hashicorp/go-version's accepted forms, which Nomad uses for plugin_version.
var semver = regexp.MustCompile(`^v?[0-9]+(\.[0-9]+)*(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$`)

// connPlugin hands out the raw connection; the host builds our stubs on it.
type connPlugin struct{ plugin.NetRPCUnsupportedPlugin }

func (connPlugin) GRPCServer(*plugin.GRPCBroker, *grpc.Server) error {
	return errors.New("this host only dispenses plugins")
}

func (connPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return c, nil
}

func pluginMap(withDevice bool) map[string]plugin.Plugin {
	m := map[string]plugin.Plugin{pluginTypeBase: connPlugin{}}
	if withDevice {
		m[pluginTypeDevice] = connPlugin{}
	}
	return m
}

// lines collects whole lines written to it (go-plugin's log output, the plugin's stderr).
type lines struct {
	mu      sync.Mutex
	partial []byte
	done    []string
}

func (l *lines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.partial = append(l.partial, p...)
	for {
		i := strings.IndexByte(string(l.partial), '\n')
		if i < 0 {
			return len(p), nil
		}
		l.done = append(l.done, string(l.partial[:i]))
		l.partial = l.partial[i+1:]
	}
}

func (l *lines) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.done
	l.done = nil
	return out
}

// monoNow is CLOCK_MONOTONIC in nanoseconds (Go's own monotonic reading is not absolute).
func monoNow() int64 {
	var ts syscall.Timespec
	syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 1, uintptr(unsafe.Pointer(&ts)), 0)
	return ts.Nano()
}

type streamItem struct {
	msg proto.Message
	err error
	at  time.Time
	// CLOCK_MONOTONIC at arrival, comparable with other processes' (the benchmark's) stamps.
	mono int64
}

// stream turns a server stream into a channel, stamping each message as it arrives.
type stream struct {
	items    chan streamItem
	cancel   context.CancelFunc
	interval time.Duration
}

func openStream(cancel context.CancelFunc, recv func() (proto.Message, error)) *stream {
	s := &stream{items: make(chan streamItem, 256), cancel: cancel}
	go func() {
		for {
			msg, err := recv()
			s.items <- streamItem{msg: msg, err: err, at: time.Now(), mono: monoNow()}
			if err != nil {
				return
			}
		}
	}()
	return s
}

type instance struct {
	client      *plugin.Client
	conn        *grpc.ClientConn
	base        basepb.BasePluginClient
	device      devicepb.DevicePluginClient
	fingerprint *stream
	stats       *stream
}

type host struct {
	hostLog      *lines
	pluginStderr *lines
	logger       hclog.Logger

	schema     *hclspecpb.Spec
	apiVersion string
	msgpack    []byte
	live       *instance
}

type command struct {
	Op         string            `json:"op"`
	Cmd        []string          `json:"cmd"`
	Env        map[string]string `json:"env"`
	Dir        string            `json:"dir"`
	Config     json.RawMessage   `json:"config"`
	RawMsgpack string            `json:"raw_msgpack_b64"`
	IDs        []string          `json:"ids"`
	TimeoutMS  int               `json:"timeout_ms"`
	IntervalMS int               `json:"interval_ms"`
}

type result map[string]interface{}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func errResult(err error, extra result) result {
	out := result{"error": err.Error(), "code": "HostError"}
	if s, ok := status.FromError(err); ok && s != nil {
		out["error"] = s.Message()
		out["code"] = s.Code().String()
	}
	for k, v := range extra {
		out[k] = v
	}
	return out
}

func protoJSON(m proto.Message) json.RawMessage {
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		return json.RawMessage(fmt.Sprintf("%q", err.Error()))
	}
	return json.RawMessage(b)
}

// withEnv sets extra variables for the plugin while it starts: go-plugin appends the host's
// own environment after Cmd.Env, so the plugin sees them only through the host's.
func withEnv(env map[string]string, f func()) {
	old := map[string]*string{}
	for k, v := range env {
		if prev, ok := os.LookupEnv(k); ok {
			p := prev
			old[k] = &p
		} else {
			old[k] = nil
		}
		os.Setenv(k, v)
	}
	defer func() {
		for k, prev := range old {
			if prev == nil {
				os.Unsetenv(k)
			} else {
				os.Setenv(k, *prev)
			}
		}
	}()
	f()
}

// start launches the plugin and dispenses one plugin type, timing each step.
func (h *host) start(c command, withDevice bool, dispense string, timing result) (*instance, error) {
	if len(c.Cmd) == 0 {
		return nil, errors.New("launch needs cmd")
	}
	var inst *instance
	var err error
	withEnv(c.Env, func() {
		cmd := exec.Command(c.Cmd[0], c.Cmd[1:]...)
		cmd.Dir = c.Dir
		client := plugin.NewClient(&plugin.ClientConfig{
			HandshakeConfig:  handshake,
			Plugins:          pluginMap(withDevice),
			Cmd:              cmd,
			AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
			Logger:           h.logger,
			Stderr:           h.pluginStderr,
		})
		began := time.Now()
		rpc, e := client.Client()
		timing["handshake_ms"] = ms(time.Since(began))
		if e != nil {
			client.Kill()
			err = e
			return
		}
		dispensed := time.Now()
		raw, e := rpc.Dispense(dispense)
		timing["dispense_ms"] = ms(time.Since(dispensed))
		if e != nil {
			client.Kill()
			err = e
			return
		}
		pinged := time.Now()
		if e := rpc.Ping(); e != nil {
			client.Kill()
			err = fmt.Errorf("health check: %w", e)
			return
		}
		timing["ping_ms"] = ms(time.Since(pinged))
		conn := raw.(*grpc.ClientConn)
		inst = &instance{
			client: client,
			conn:   conn,
			base:   basepb.NewBasePluginClient(conn),
			device: devicepb.NewDevicePluginClient(conn),
		}
		if rc := client.ReattachConfig(); rc != nil {
			timing["pid"] = rc.Pid
			timing["address"] = rc.Addr.String()
		}
		timing["negotiated_version"] = client.NegotiatedVersion()
	})
	return inst, err
}

func (h *host) kill(inst *instance, timing result) {
	if inst.fingerprint != nil {
		inst.fingerprint.cancel()
	}
	if inst.stats != nil {
		inst.stats.cancel()
	}
	began := time.Now()
	inst.client.Kill()
	timing["kill_ms"] = ms(time.Since(began))
	timing["exited"] = inst.client.Exited()
}

func (h *host) setConfig(inst *instance, cfg []byte, agent *basepb.NomadConfig) error {
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	_, err := inst.base.SetConfig(ctx, &basepb.SetConfigRequest{
		MsgpackConfig:    cfg,
		NomadConfig:      agent,
		PluginApiVersion: h.apiVersion,
	})
	return err
}

func agentConfig() *basepb.NomadConfig {
	return &basepb.NomadConfig{Driver: &basepb.NomadDriverConfig{
		ClientMinPort: clientMinPort, ClientMaxPort: clientMaxPort,
	}}
}

// encodeConfig decodes a JSON config with the plugin's schema and msgpack-encodes it.
func (h *host) encodeConfig(c command) ([]byte, error) {
	if c.RawMsgpack != "" {
		return base64.StdEncoding.DecodeString(c.RawMsgpack)
	}
	cfg, err := parseJSONObject(c.Config)
	if err != nil {
		return nil, err
	}
	if h.schema == nil || h.schema.GetBlock() == nil {
		if len(cfg) > 0 {
			return nil, errors.New("configuration not allowed but config passed")
		}
		return nil, nil
	}
	value, err := decodeConfig(h.schema, cfg)
	if err != nil {
		return nil, fmt.Errorf("failed parsing config: %v", err)
	}
	return encodeMsgpack(value)
}

func (h *host) launch(c command) result {
	if h.live != nil {
		return errResult(errors.New("a launched plugin is still running: kill it first"), nil)
	}
	var stages []result

	// 1. Fingerprint the plugin binary.
	fp := result{"stage": "fingerprint"}
	stages = append(stages, fp)
	inst, err := h.start(c, false, pluginTypeBase, fp)
	if err != nil {
		return errResult(err, result{"stage": "fingerprint", "stages": stages})
	}
	fail := func(stage string, inst *instance, err error) result {
		out := errResult(err, result{"stage": stage, "stages": stages})
		timing := result{}
		h.kill(inst, timing)
		out["kill_ms"] = timing["kill_ms"]
		return out
	}
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	info, err := inst.base.PluginInfo(ctx, &basepb.PluginInfoRequest{})
	cancel()
	if err != nil {
		return fail("fingerprint", inst, err)
	}
	fp["plugin_info"] = protoJSON(info)
	if info.GetType() != basepb.PluginType_DEVICE {
		return fail("fingerprint", inst, fmt.Errorf("plugin is of type %s, not a device plugin", info.GetType()))
	}
	if !semver.MatchString(info.GetPluginVersion()) {
		return fail("fingerprint", inst, fmt.Errorf("failed to parse plugin version %q", info.GetPluginVersion()))
	}
	h.apiVersion = ""
	for _, v := range info.GetPluginApiVersions() {
		if v == deviceAPIVersion {
			h.apiVersion = v
		}
	}
	if h.apiVersion == "" {
		// Nomad skips such a plugin with a warning.
		return fail("fingerprint", inst, fmt.Errorf("no plugin API version in common: plugin %v, Nomad [%s]",
			info.GetPluginApiVersions(), deviceAPIVersion))
	}
	ctx, cancel = context.WithTimeout(context.Background(), rpcTimeout)
	schema, err := inst.base.ConfigSchema(ctx, &basepb.ConfigSchemaRequest{})
	cancel()
	if err != nil {
		return fail("fingerprint", inst, err)
	}
	h.schema = schema.GetSpec()
	fp["config_schema"] = protoJSON(schema)
	h.kill(inst, fp)

	// 2. Validate the config (only when the plugin has a schema).
	h.msgpack, err = h.encodeConfig(c)
	if err != nil {
		return errResult(err, result{"stage": "validate", "stages": stages})
	}
	if h.schema != nil && h.schema.GetBlock() != nil {
		val := result{"stage": "validate"}
		stages = append(stages, val)
		inst, err = h.start(c, true, pluginTypeDevice, val)
		if err != nil {
			return errResult(err, result{"stage": "validate", "stages": stages})
		}
		for i := 0; i < 2; i++ {
			began := time.Now()
			if err := h.setConfig(inst, h.msgpack, nil); err != nil {
				return fail("validate", inst, err)
			}
			val[fmt.Sprintf("set_config_%d_ms", i+1)] = ms(time.Since(began))
		}
		h.kill(inst, val)
	}

	// 3. The long-lived instance.
	run := result{"stage": "run"}
	stages = append(stages, run)
	inst, err = h.start(c, true, pluginTypeDevice, run)
	if err != nil {
		return errResult(err, result{"stage": "run", "stages": stages})
	}
	began := time.Now()
	if err := h.setConfig(inst, h.msgpack, agentConfig()); err != nil {
		return fail("run", inst, err)
	}
	run["set_config_ms"] = ms(time.Since(began))
	h.live = inst
	return result{"stages": stages, "msgpack_config_b64": base64.StdEncoding.EncodeToString(h.msgpack)}
}

func (h *host) next(s *stream, timeoutMS int) (result, bool) {
	if timeoutMS <= 0 {
		timeoutMS = 5000
	}
	select {
	case item := <-s.items:
		if item.err == io.EOF {
			return result{"error": "stream ended", "code": "EOF", "received_unix_ns": item.at.UnixNano()}, true
		}
		if item.err != nil {
			return errResult(item.err, result{"received_unix_ns": item.at.UnixNano()}), true
		}
		out := result{"message": protoJSON(item.msg), "received_unix_ns": item.at.UnixNano(), "received_mono_ns": item.mono}
		if fp, ok := item.msg.(*devicepb.FingerprintResponse); ok {
			// What the Nomad client would refuse in this message (empty: it takes it).
			out["nomad_refuses"] = validateFingerprint(fp)
		}
		return out, false
	case <-time.After(time.Duration(timeoutMS) * time.Millisecond):
		return result{"error": fmt.Sprintf("no message within %d ms", timeoutMS), "code": "Timeout"}, false
	}
}

func (h *host) handle(c command) result {
	if c.Op == "launch" {
		return h.launch(c)
	}
	if c.Op == "logs" {
		var entries []interface{}
		for _, line := range h.hostLog.take() {
			var entry map[string]interface{}
			if json.Unmarshal([]byte(line), &entry) == nil {
				entries = append(entries, entry)
			} else {
				entries = append(entries, line)
			}
		}
		return result{"host_log": entries, "plugin_stderr": h.pluginStderr.take()}
	}
	inst := h.live
	if inst == nil {
		return errResult(errors.New("no launched plugin: launch first"), nil)
	}
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	began := time.Now()
	switch c.Op {
	case "ping":
		rpc, err := inst.client.Client()
		if err == nil {
			err = rpc.Ping()
		}
		if err != nil {
			return errResult(err, nil)
		}
		return result{"ok": true, "ms": ms(time.Since(began))}
	case "plugin_info":
		resp, err := inst.base.PluginInfo(ctx, &basepb.PluginInfoRequest{})
		if err != nil {
			return errResult(err, nil)
		}
		return result{"message": protoJSON(resp), "ms": ms(time.Since(began))}
	case "config_schema":
		resp, err := inst.base.ConfigSchema(ctx, &basepb.ConfigSchemaRequest{})
		if err != nil {
			return errResult(err, nil)
		}
		return result{"message": protoJSON(resp), "ms": ms(time.Since(began))}
	case "set_config":
		cfg, err := h.encodeConfig(c)
		if err != nil {
			return errResult(err, result{"code": "ConfigRefusedByNomad"})
		}
		if err := h.setConfig(inst, cfg, agentConfig()); err != nil {
			return errResult(err, nil)
		}
		return result{"ok": true, "ms": ms(time.Since(began))}
	case "fingerprint_next":
		if inst.fingerprint == nil {
			sctx, scancel := context.WithCancel(context.Background())
			st, err := inst.device.Fingerprint(sctx, &devicepb.FingerprintRequest{})
			if err != nil {
				scancel()
				return errResult(err, nil)
			}
			inst.fingerprint = openStream(scancel, func() (proto.Message, error) { return st.Recv() })
		}
		out, ended := h.next(inst.fingerprint, c.TimeoutMS)
		if ended {
			inst.fingerprint.cancel()
			inst.fingerprint = nil
		}
		return out
	case "fingerprint_cancel", "stats_cancel":
		target := &inst.fingerprint
		if c.Op == "stats_cancel" {
			target = &inst.stats
		}
		if *target != nil {
			(*target).cancel()
			*target = nil
		}
		return result{"ok": true}
	case "reserve":
		resp, err := inst.device.Reserve(ctx, &devicepb.ReserveRequest{DeviceIds: c.IDs})
		if err != nil {
			return errResult(err, result{"ms": ms(time.Since(began))})
		}
		return result{"message": protoJSON(resp), "ms": ms(time.Since(began))}
	case "stats_next":
		interval := time.Duration(c.IntervalMS) * time.Millisecond
		if inst.stats != nil && inst.stats.interval != interval {
			inst.stats.cancel()
			inst.stats = nil
		}
		if inst.stats == nil {
			sctx, scancel := context.WithCancel(context.Background())
			st, err := inst.device.Stats(sctx, &devicepb.StatsRequest{CollectionInterval: durationpb.New(interval)})
			if err != nil {
				scancel()
				return errResult(err, nil)
			}
			inst.stats = openStream(scancel, func() (proto.Message, error) { return st.Recv() })
			inst.stats.interval = interval
		}
		out, ended := h.next(inst.stats, c.TimeoutMS)
		if ended {
			inst.stats.cancel()
			inst.stats = nil
		}
		return out
	case "kill":
		timing := result{}
		h.kill(inst, timing)
		h.live = nil
		return timing
	}
	return errResult(fmt.Errorf("unknown op %q", c.Op), nil)
}

func main() {
	h := &host{hostLog: &lines{}, pluginStderr: &lines{}}
	h.logger = hclog.New(&hclog.LoggerOptions{
		Name:       "nomad-host",
		Level:      hclog.Trace,
		Output:     h.hostLog,
		JSONFormat: true,
	})
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var c command
		var res result
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			res = errResult(fmt.Errorf("bad command: %v", err), nil)
		} else {
			res = h.handle(c)
			res["op"] = c.Op
		}
		if err := out.Encode(res); err != nil {
			fmt.Fprintln(os.Stderr, "host: cannot write result:", err)
			os.Exit(2)
		}
	}
	// stdin closed: leave no plugin behind.
	if h.live != nil {
		h.kill(h.live, result{})
	}
}
