// The kubelet's own device manager, driven by hotplug-monitor's tests.
//
// tests/host/kubelet/build.sh copies this file into the kubelet's pkg/kubelet/cm/devicemanager
// and builds that package's test binary, so this code calls the manager's internals exactly as
// the kubelet does: newManagerImpl, Start, Allocate, GetDeviceRunContainerOptions, GetCapacity,
// Stop; and it serves the kubelet's real PodResources servers (v1alpha1 and v1) over the
// manager. It runs only when HOTPLUG_MONITOR_DRIVER=1, reading one JSON command per line on
// stdin and answering each with one line on stdout that starts with "@@ " (klog and the test
// framework write other lines). See tests/host/kubelet/devicemanager.py for the commands.
package devicemanager

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	cadvisorapi "github.com/google/cadvisor/info/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"
	podresourcesv1alpha1 "k8s.io/kubelet/pkg/apis/podresources/v1alpha1"
	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
)

type hmCommand struct {
	Op          string   `json:"op"`
	Socket      string   `json:"socket"`
	NumaNodes   []int    `json:"numa_nodes"`
	Resource    string   `json:"resource"`
	Capacity    *int64   `json:"capacity"`
	Allocatable *int64   `json:"allocatable"`
	TimeoutMs   int      `json:"timeout_ms"`
	Pod         string   `json:"pod"`
	Count       int64    `json:"count"`
	Versions    []string `json:"versions"`
}

type hmDriver struct {
	mu        sync.Mutex
	m         *ManagerImpl
	socket    string
	numaNodes []int
	pods      []*v1.Pod
	updates   int
	// When the last ListAndWatch message reached the callback (CLOCK_MONOTONIC ns).
	arrivedMono int64
	changed     chan struct{}
	pr          *grpc.Server
}

func (d *hmDriver) activePods() []*v1.Pod {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]*v1.Pod{}, d.pods...)
}

// The PodResources servers' providers, as the kubelet wires them.
func (d *hmDriver) GetPods() []*v1.Pod { return d.activePods() }
func (d *hmDriver) GetDevices(podUID, containerName string) []*podresourcesv1.ContainerDevices {
	return d.manager().GetDevices(podUID, containerName)
}
func (d *hmDriver) UpdateAllocatedDevices()                      { d.manager().UpdateAllocatedDevices() }
func (d *hmDriver) GetCPUs(podUID, containerName string) []int64 { return nil }

func (d *hmDriver) manager() *ManagerImpl {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.m
}

func (d *hmDriver) start() error {
	var topology []cadvisorapi.Node
	for _, id := range d.numaNodes {
		topology = append(topology, cadvisorapi.Node{Id: id})
	}
	m, err := newManagerImpl(d.socket, topology, topologymanager.NewFakeManager())
	if err != nil {
		return err
	}
	original := m.callback
	m.callback = func(resourceName string, devices []pluginapi.Device) {
		// The ListAndWatch message, stamped before the manager applies it (GetCapacity may
		// show the new devices while the callback still writes the checkpoint).
		d.mu.Lock()
		d.arrivedMono = monotonicNs()
		d.mu.Unlock()
		original(resourceName, devices)
		d.mu.Lock()
		d.updates++
		close(d.changed)
		d.changed = make(chan struct{})
		d.mu.Unlock()
	}
	if err := m.Start(d.activePods, &sourcesReadyStub{}); err != nil {
		return err
	}
	d.mu.Lock()
	d.m = m
	d.mu.Unlock()
	return nil
}

func quantities(list v1.ResourceList) map[string]int64 {
	out := map[string]int64{}
	for name, q := range list {
		out[string(name)] = q.Value()
	}
	return out
}

func (d *hmDriver) capacity() map[string]interface{} {
	capacity, allocatable, _ := d.manager().GetCapacity()
	d.mu.Lock()
	updates, arrived := d.updates, d.arrivedMono
	d.mu.Unlock()
	return map[string]interface{}{
		"capacity": quantities(capacity), "allocatable": quantities(allocatable),
		"updates": updates, "message_mono_ns": arrived,
	}
}

// wait: until the resource's capacity and allocatable are those asked (either may be left out).
func (d *hmDriver) wait(c hmCommand) map[string]interface{} {
	began := time.Now()
	deadline := began.Add(time.Duration(c.TimeoutMs) * time.Millisecond)
	for {
		d.mu.Lock()
		changed := d.changed
		d.mu.Unlock()
		now := d.capacity()
		capacity := now["capacity"].(map[string]int64)[c.Resource]
		allocatable := now["allocatable"].(map[string]int64)[c.Resource]
		if (c.Capacity == nil || *c.Capacity == capacity) &&
			(c.Allocatable == nil || *c.Allocatable == allocatable) {
			now["received_unix_ns"] = time.Now().UnixNano()
			now["received_mono_ns"] = monotonicNs() // the benchmark's clock (CLOCK_MONOTONIC)
			now["waited_ms"] = float64(time.Since(began).Microseconds()) / 1000
			return now
		}
		if time.Now().After(deadline) {
			now["error"] = "timeout"
			return now
		}
		// A stopped endpoint marks its devices unhealthy without a callback: look again soon.
		select {
		case <-changed:
		case <-time.After(2 * time.Millisecond):
		}
	}
}

func monotonicNs() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return ts.Nano()
}

func (d *hmDriver) devices(resource string) []map[string]interface{} {
	m := d.manager()
	m.mutex.Lock()
	defer m.mutex.Unlock()
	out := []map[string]interface{}{}
	for id, dev := range m.allDevices[resource] {
		nodes := []int64{}
		if dev.Topology != nil {
			for _, n := range dev.Topology.Nodes {
				nodes = append(nodes, n.ID)
			}
		}
		out = append(out, map[string]interface{}{"id": id, "health": dev.Health, "numa": nodes})
	}
	sort.Slice(out, func(i, j int) bool { return out[i]["id"].(string) < out[j]["id"].(string) })
	return out
}

func (d *hmDriver) allocate(c hmCommand) map[string]interface{} {
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: c.Pod, Namespace: "default", UID: types.UID("uid-" + c.Pod)},
		Spec: v1.PodSpec{Containers: []v1.Container{{
			Name: "main",
			Resources: v1.ResourceRequirements{Limits: v1.ResourceList{
				v1.ResourceName(c.Resource): *resource.NewQuantity(c.Count, resource.DecimalSI),
			}},
		}}},
	}
	d.mu.Lock()
	d.pods = append(d.pods, pod)
	d.mu.Unlock()
	m := d.manager()
	container := &pod.Spec.Containers[0]
	began := time.Now()
	if err := m.Allocate(pod, container); err != nil {
		d.removePod(c.Pod)
		return map[string]interface{}{"error": err.Error()}
	}
	took := float64(time.Since(began).Microseconds()) / 1000
	opts, err := m.GetDeviceRunContainerOptions(pod, container)
	if err != nil {
		return map[string]interface{}{"error": err.Error()}
	}
	envs := map[string]string{}
	for _, e := range opts.Envs {
		envs[e.Name] = e.Value
	}
	devs := []map[string]string{}
	for _, dev := range opts.Devices {
		devs = append(devs, map[string]string{
			"host_path": dev.PathOnHost, "container_path": dev.PathInContainer,
			"permissions": dev.Permissions,
		})
	}
	mounts := []map[string]interface{}{}
	for _, mount := range opts.Mounts {
		mounts = append(mounts, map[string]interface{}{
			"host_path": mount.HostPath, "container_path": mount.ContainerPath,
			"read_only": mount.ReadOnly,
		})
	}
	annotations := map[string]string{}
	for _, a := range opts.Annotations {
		annotations[a.Name] = a.Value
	}
	ids := m.podDevices.containerDevices(string(pod.UID), container.Name, c.Resource).List()
	return map[string]interface{}{
		"device_ids": ids, "envs": envs, "devices": devs, "mounts": mounts,
		"annotations": annotations, "allocate_ms": took,
	}
}

func (d *hmDriver) removePod(name string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	kept := d.pods[:0]
	for _, p := range d.pods {
		if p.Name != name {
			kept = append(kept, p)
		}
	}
	d.pods = kept
}

// servePodResources serves the kubelet's PodResources servers of the versions asked (default
// both, as kubelet 1.20 does).
func (d *hmDriver) servePodResources(socket string, versions []string) error {
	os.Remove(socket)
	l, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	if len(versions) == 0 {
		versions = []string{"v1alpha1", "v1"}
	}
	s := grpc.NewServer()
	for _, version := range versions {
		switch version {
		case "v1alpha1":
			podresourcesv1alpha1.RegisterPodResourcesListerServer(s, podresources.NewV1alpha1PodResourcesServer(d, d))
		case "v1":
			podresourcesv1.RegisterPodResourcesListerServer(s, podresources.NewV1PodResourcesServer(d, d, d))
		}
	}
	go s.Serve(l)
	d.pr = s
	return nil
}

func (d *hmDriver) handle(c hmCommand) interface{} {
	fail := func(err error) interface{} { return map[string]interface{}{"error": err.Error()} }
	switch c.Op {
	case "start":
		d.socket, d.numaNodes = c.Socket, c.NumaNodes
		if err := d.start(); err != nil {
			return fail(err)
		}
		return map[string]interface{}{"ok": true}
	case "restart": // as a kubelet restart does: a new manager on the same socket directory
		began, beganMono := time.Now(), monotonicNs()
		d.manager().Stop()
		if err := d.start(); err != nil {
			return fail(err)
		}
		return map[string]interface{}{
			"ok": true, "restarted_unix_ns": began.UnixNano(), "restarted_mono_ns": beganMono,
		}
	case "stop":
		d.manager().Stop()
		return map[string]interface{}{"ok": true}
	case "capacity":
		return d.capacity()
	case "wait":
		return d.wait(c)
	case "devices":
		return map[string]interface{}{"devices": d.devices(c.Resource)}
	case "allocate":
		return d.allocate(c)
	case "remove_pod":
		d.removePod(c.Pod)
		d.manager().UpdateAllocatedDevices()
		return map[string]interface{}{"ok": true}
	case "serve_pod_resources":
		if err := d.servePodResources(c.Socket, c.Versions); err != nil {
			return fail(err)
		}
		return map[string]interface{}{"ok": true}
	}
	return fail(fmt.Errorf("unknown op %q", c.Op))
}

func TestHotplugMonitorDriver(t *testing.T) {
	if os.Getenv("HOTPLUG_MONITOR_DRIVER") != "1" {
		t.Skip("run by hotplug-monitor's tests (HOTPLUG_MONITOR_DRIVER=1)")
	}
	d := &hmDriver{changed: make(chan struct{})}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var c hmCommand
		var answer interface{}
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			answer = map[string]interface{}{"error": err.Error()}
		} else {
			answer = d.handle(c)
		}
		os.Stdout.WriteString("@@ ")
		out.Encode(answer)
	}
	if m := d.manager(); m != nil {
		m.Stop()
	}
	if d.pr != nil {
		d.pr.Stop()
	}
}
