"""hotplug-monitor: GPU and PCI accelerator hotplug and health, served on a Unix socket."""
