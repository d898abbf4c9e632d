package main

// What the Nomad client checks in each Fingerprint message before it takes the devices
// (facts from Nomad's plugins/device DeviceGroup.Validate and plugins/shared/structs
// Attribute.Validate): a group needs a vendor, a type and a name; a device needs an ID; an
// attribute holds exactly one value, and a unit only on a number, one of Nomad's known units.
// A message that fails makes the client stop using the plugin, so the host reports each
// failure next to the message it found it in.

import (
	"fmt"

	devicepb "hotplugmonitor/nomadpb/device"
	structspb "hotplugmonitor/nomadpb/structs"
)

// Nomad's unit names (plugins/shared/structs/units.go).
var nomadUnits = map[string]bool{}

func init() {
	for _, u := range []string{
		"KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "kB", "KB", "MB", "GB", "TB", "PB", "EB",
		"KiB/s", "MiB/s", "GiB/s", "TiB/s", "PiB/s", "EiB/s",
		"kB/s", "KB/s", "MB/s", "GB/s", "TB/s", "PB/s", "EB/s",
		"MHz", "GHz", "mW", "W", "kW", "MW", "GW",
	} {
		nomadUnits[u] = true
	}
}

func validateFingerprint(resp *devicepb.FingerprintResponse) []string {
	problems := []string{}
	for i, g := range resp.GetDeviceGroup() {
		where := fmt.Sprintf("device group %d", i)
		if g.GetVendor() == "" {
			problems = append(problems, where+": device vendor must be specified")
		}
		if g.GetDeviceType() == "" {
			problems = append(problems, where+": device type must be specified")
		}
		if g.GetDeviceName() == "" {
			problems = append(problems, where+": device name must be specified")
		}
		for j, d := range g.GetDevices() {
			if d.GetID() == "" {
				problems = append(problems, fmt.Sprintf("%s: device %d: device ID must be specified", where, j))
			}
		}
		for name, a := range g.GetAttributes() {
			if a.GetValue() == nil {
				problems = append(problems, fmt.Sprintf("%s: device attribute %q invalid: no attribute value set", where, name))
				continue
			}
			if a.GetUnit() == "" {
				continue
			}
			if !nomadUnits[a.GetUnit()] {
				problems = append(problems, fmt.Sprintf("%s: device attribute %q invalid: unrecognized unit %q", where, name, a.GetUnit()))
			}
			switch a.GetValue().(type) {
			case *structspb.Attribute_StringVal, *structspb.Attribute_BoolVal:
				problems = append(problems, fmt.Sprintf("%s: device attribute %q invalid: unit can not be specified on a boolean or string attribute", where, name))
			}
		}
	}
	return problems
}
