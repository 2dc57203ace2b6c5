// `epcopy probe`: print what this host offers for migration, in words or as JSON.

import ArgumentParser
import EpcopyHostEngine
import Foundation

struct Probe: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what this host offers: userfaultfd, io_uring, QEMU, KVM or TCG, NUMA, libvirt.",
        discussion: """
            Every capability is exercised for real (a userfaultfd is opened both ways, a shared-memory \
            range is registered, an io_uring is set up), so "yes" means epcopy's path works here.
            Set EPCOPY_ACCEL=kvm only where KVM guests are known to boot; otherwise QEMU runs under TCG.
            """
    )

    @Option(name: .customLong("connect"), help: ArgumentHelp("The libvirt daemon to ask whether it answers.", valueName: "uri"))
    var libvirtURI = "qemu:///system"
    @OptionGroup var output: OutputOptions

    func run() throws {
        let report = HostProbe.run(libvirtURI: libvirtURI)
        if output.json {
            print(try JSONOutput.string(report))
        } else {
            print(Self.text(report), terminator: "")
        }
    }

    static func text(_ r: HostProbeReport) -> String {
        func yes(_ b: Bool) -> String { b ? "yes" : "no" }
        func outcome(_ o: HostProbeReport.Outcome) -> String { o.ok ? "yes" : "no (\(o.error ?? "?"))" }
        let have = UffdFeatures.named.map(\.0).filter { r.uffdFeatures[$0] == true }
        let lack = UffdFeatures.named.map(\.0).filter { r.uffdFeatures[$0] != true }
        var rows: [(String, String)] = [
            ("kernel", r.kernel),
            ("userfaultfd", "\(yes(r.userfaultfd)) — syscall: \(outcome(r.userfaultfdSyscall)); "
                + "/dev/userfaultfd: \(outcome(r.userfaultfdDevice))"),
            ("uffd features", have.isEmpty ? "none" : have.joined(separator: " ")),
        ]
        if !lack.isEmpty { rows.append(("  not offered", lack.joined(separator: " "))) }
        rows += [
            ("shmem MISSING", r.shmemMissing
                ? "yes — range ioctls: \(r.shmemMissingIoctls.joined(separator: " "))"
                : "no (\(r.shmemMissingError ?? "?"))"),
            ("shmem MINOR", yes(r.shmemMinor)),
            ("shmem WP", yes(r.shmemWP)),
            ("io_uring", r.ioUring ? "yes — \(r.ioUringOpcodes.count) opcodes" : "no (\(r.ioUringError ?? "?"))"),
            ("qemu", r.qemu.map { "\($0) (\(r.qemuPath ?? ""))" } ?? "not installed"),
            ("accel", "\(r.accel) — \(r.accelReason)"),
            ("numa nodes", r.numaAvailable ? "\(r.numaNodes)" : "1 (libnuma: NUMA not available)"),
        ]
        for node in r.numaTopology {
            rows.append(("  node \(node.id)", "\(node.freeBytes >> 20) of \(node.totalBytes >> 20) MiB free, CPUs "
                + (node.cpus.isEmpty ? "none" : node.cpus.map(String.init).joined(separator: ","))))
        }
        rows.append(("libvirt", r.libvirt ?? "not available"))
        if let uri = r.libvirtURI, let daemon = r.libvirtDaemon {
            rows.append(("  daemon", daemon.ok ? "answers at \(uri) (libvirt \(r.libvirtDaemonVersion ?? "?"))"
                                               : "no answer at \(uri): \(daemon.error ?? "?")"))
        }
        let width = rows.map(\.0.count).max() ?? 0
        return rows.map { $0.0.padding(toLength: width + 2, withPad: " ", startingAt: 0) + $0.1 + "\n" }.joined()
    }
}

enum JSONOutput {
    /// Sorted keys so the output is stable and diffable.
    static func string<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }
}
