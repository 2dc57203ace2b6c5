/*
 * CVirt: system library module for <libvirt/libvirt.h>, its errors and libvirt-qemu (monitor pass-through),
 * found through pkg-config.
 * Import SwiftGlibc first: otherwise glibc's headers are parsed a second time into this module and
 * clang cannot merge their anonymous structs (fd_set) with SwiftGlibc's, failing clean builds.
 */
#if defined(__swift__) && __has_feature(modules)
#pragma clang module import SwiftGlibc
#endif
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <libvirt/libvirt-qemu.h>
