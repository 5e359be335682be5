//! `cleanup` and `cleanup-wait`: restore containerd's mirror configuration on uninstall.
