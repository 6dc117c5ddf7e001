//! Virtual machines: qemu-img, the QEMU command line, QMP, the accelerator probe, the
//! cloud-init seed, and the lifecycle of one running VM. Knows nothing of components.
