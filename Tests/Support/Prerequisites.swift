// What a test needs from this machine beyond the build — QEMU, the built guest images, root — checked once, and
// the reason a test is skipped when one is missing, with the command that provides it. `make test` installs and
// builds all of them, so under it nothing skips; a bare `swift test` on a half-set-up machine says what it skipped.

import Foundation

public struct Prerequisite: Sendable {
    public let isMet: Bool
    /// Why the test cannot run here and how to fix that.
    public let reason: String

    public init(isMet: Bool, reason: String) {
        self.isMet = isMet
        self.reason = reason
    }

    /// The repository this test bundle was built from.
    public static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../..").standardized.path

    /// The test guest: a kernel and the initrd with the memory tester and the agent (Workloads/guest/out).
    public static let testGuestDirectory = "\(repository)/Workloads/guest/out"
    public static var testGuestKernel: String? {
        ["vmlinux", "bzImage"].map { "\(testGuestDirectory)/\($0)" }.first(where: exists)
    }
    public static let testGuestInitrd = "\(testGuestDirectory)/initrd.img"

    /// The benchmark guest: Debian with memcached and MariaDB (Workloads/images/out).
    public static let benchImageDirectory = "\(repository)/Workloads/images/out"

    public static let qemu = Prerequisite(
        isMet: findExecutable(ProcessInfo.processInfo.environment["EPCOPY_QEMU"] ?? "qemu-system-x86_64"),
        reason: "qemu-system-x86_64 is not installed (apt-get install -y qemu-system-x86)")

    public static let testGuest = Prerequisite(
        isMet: qemu.isMet && testGuestKernel != nil && exists(testGuestInitrd),
        reason: qemu.isMet ? "the test guest is not built in \(testGuestDirectory): run `make guest`" : qemu.reason)

    /// The test guest's initrd with the NUMA placement check (epcopy-numa-check) appended: `make guest`.
    public static let testGuestNumaInitrd = "\(testGuestDirectory)/initrd-numa.img"
    public static let numaCheckGuest = Prerequisite(
        isMet: testGuest.isMet && exists(testGuestNumaInitrd),
        reason: testGuest.isMet ? "\(testGuestNumaInitrd) is not built: run `make guest` (it builds make numa-check first)"
                                : testGuest.reason)

    public static let benchImage = Prerequisite(
        isMet: testGuest.isMet && exists("\(benchImageDirectory)/bench.img"),
        reason: testGuest.isMet ? "the benchmark image is not built in \(benchImageDirectory): run `make images`"
                                : testGuest.reason)

    public static let root = Prerequisite(isMet: geteuid() == 0, reason: "needs root")

    /// Network namespaces and veth pairs: root and the `ip` tool.
    public static let namespaces = Prerequisite(
        isMet: geteuid() == 0 && findExecutable("ip"),
        reason: "needs root and iproute2 (apt-get install -y iproute2) for network namespaces")

    /// A libvirt daemon with its QEMU driver, and virsh (scripts/install-deps installs them).
    public static let libvirt = Prerequisite(
        isMet: findExecutable("/usr/sbin/libvirtd") && findExecutable("virsh"),
        reason: "libvirtd and virsh are not installed (scripts/install-deps: libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)")

    private static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    private static func findExecutable(_ name: String) -> Bool {
        if name.contains("/") { return access(name, X_OK) == 0 }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        return path.split(separator: ":").contains { access("\($0)/\(name)", X_OK) == 0 }
    }
}
