//! Template builds: the Debian base rootfs and the layer store.
