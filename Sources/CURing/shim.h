/*
 * CURing: system library module for <liburing.h>, found through pkg-config.
 * Import SwiftGlibc first: otherwise glibc's headers are parsed a second time into this module and
 * clang cannot merge their anonymous structs (fd_set) with SwiftGlibc's, failing clean builds.
 */
#if defined(__swift__) && __has_feature(modules)
#pragma clang module import SwiftGlibc
#endif
#include <liburing.h>
