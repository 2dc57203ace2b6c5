// What a migration is asked to do: the mode, the options both sides share, and the VM a destination must
// recreate (same machine, memory and boot image). These are the inputs of every step in SourceSide and
// DestinationSide; the daemon sends VMSpec over its control link, so its fields are a wire format.

import EpcopyProtocol

public enum MigrationMode: String, Sendable, Codable, CaseIterable {
    /// External post-copy: device state through QEMU, RAM through epcopy's engines.
    case enlightened
    /// QEMU's own postcopy (postcopy-ram, migrate, migrate-start-postcopy at once).
    case postcopy
    /// QEMU's own precopy.
    case precopy
}

public struct MigrationOptions: Sendable {
    public var mode: MigrationMode
    public var verify: Bool
    public var link: LinkSpec
    /// The LD_PRELOAD shim for the destination QEMU (enlightened mode).
    public var preloadLibrary: String
    /// Seconds to watch the guest after the transfer for its verdict.
    public var settleSeconds: Double
    public var authKey: [UInt8]?
    /// Ask the guest agent for hot and free reports (enlightened mode); without an answer within
    /// `agentTimeoutMillis` the migration is plain external post-copy with neighbour prefetch.
    public var useAgent: Bool = true
    public var agentTimeoutMillis: UInt64 = 3000
    /// How long the destination waits for the agent's post-resume free scan (pages it reports later are still
    /// skipped if not yet sent; the source stops holding believed-free pages back after its own deadline).
    public var freeScanTimeoutMillis: UInt64 = 10_000
    /// Observation window for the hot report (used where the guest kernel has idle page tracking).
    public var hotWindowMillis: UInt32 = 0
    /// A hot report taken in the background (`HotReportKeeper`, the daemon's `--hot-report-every`): used instead
    /// of asking at the switch if it is at most `hotReportMaxAgeMillis` old.
    public var keptHotReport: KeptHotReport?
    public var hotReportMaxAgeMillis: UInt64 = 30_000
    /// With a kept report in hand, the switch still asks the agent for a fresh one but waits at most this long:
    /// a responsive guest gives a current picture (pages freed since the kept report are then held back with the
    /// believed-free ones instead of pushed early), a busy one costs only this much. 0: use the kept one as is.
    public var freshReportBudgetMillis: UInt64 = 500
    /// After the switch, how long both engines keep trying to get a lost link back (enlightened mode). The guest
    /// runs on wherever it has its pages meanwhile; a vCPU that faults on a missing page waits. 0: a lost link
    /// fails the migration at once (the VM is then stuck: only for tests and tools that cannot recover).
    public var reconnectTimeoutMillis: Int32 = 120_000
    /// Destination, enlightened mode: the host NUMA node the guest's RAM is bound to before the first page lands
    /// (nil: no binding, the kernel's default policy).
    public var numa: NumaRequest?
    /// Keepalives between the engines, and how much silence is a lost link (a black hole gives no error).
    public var keepalive: KeepaliveSpec = .standard

    public init(mode: MigrationMode, verify: Bool = true, link: LinkSpec = .unshaped, preloadLibrary: String,
                settleSeconds: Double = 3, authKey: [UInt8]? = nil) {
        self.mode = mode
        self.verify = verify
        self.link = link
        self.preloadLibrary = preloadLibrary
        self.settleSeconds = settleSeconds
        self.authKey = authKey
    }
}

/// The guest image a VM boots (kernel, initrd, command line).
public struct GuestImage: Sendable {
    public var kernel: String
    public var initrd: String
    public var append: String

    public init(kernel: String, initrd: String, append: String) {
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
    }
}

/// What a destination needs to recreate the VM: the same machine, memory and boot image.
public struct VMSpec: Codable, Sendable, Equatable {
    public var name: String
    public var memoryMiB: Int
    /// See QEMUConfig.ramPadKiB; the destination must have exactly the source's RAM size.
    public var ramPadKiB: Int?
    /// The VM's qcow2 disk on shared storage, if any (same path on both hosts).
    public var disk: String?
    /// Guest TCP ports forwarded from the address of the host the VM runs on.
    public var forwards: [UInt16]?
    public var vcpus: Int
    public var kernel: String?
    public var initrd: String?
    public var append: String?
    public var accel: String

    public init(name: String, memoryMiB: Int, vcpus: Int = 1, kernel: String?, initrd: String?, append: String?,
                accel: String = QEMUConfig.defaultAccel()) {
        self.name = name
        self.memoryMiB = memoryMiB
        self.vcpus = vcpus
        self.kernel = kernel
        self.initrd = initrd
        self.append = append
        self.accel = accel
    }

    public init(_ config: QEMUConfig) {
        self.init(name: config.name, memoryMiB: config.memoryMiB, vcpus: config.vcpus, kernel: config.kernel,
                  initrd: config.initrd, append: config.append, accel: config.accel)
        ramPadKiB = config.ramPadKiB
        disk = config.disk
        forwards = config.forwards.isEmpty ? nil : config.forwards
    }

    /// A QEMU configuration for this VM on this host under the name `name`.
    public func config(name: String, deadlineSeconds: Double = 3600) -> QEMUConfig {
        var config = QEMUConfig(name: name, memoryMiB: memoryMiB, vcpus: vcpus, accel: accel,
                                deadlineSeconds: deadlineSeconds)
        config.kernel = kernel
        config.initrd = initrd
        config.append = append
        if let ramPadKiB { config.ramPadKiB = ramPadKiB }
        config.disk = disk
        config.forwards = forwards ?? []
        return config
    }
}

extension MigrationOptions {
    /// The source engine's options for this migration: what both a source side and a source taken up again
    /// after a restart run with. Free pages are held `freeHoldMillis` at most: the destination always says when
    /// its scan is over (answered or not, at most freeScanTimeout after RESUME); the source's own deadline is
    /// only for a destination that never says anything, and a RESUME that takes seconds (a starved destination)
    /// must not run it out.
    func sourceEngineOptions(session: UInt64, vmName: String, classes: [(PushClass, PageSet<PageIndex>)]) -> SourceOptions {
        var engine = SourceOptions(sessionID: session, vmName: vmName, link: link, classes: classes,
                                   releaseMemory: !verify, authKey: authKey)
        engine.reconnectTimeoutMillis = reconnectTimeoutMillis
        engine.keepalive = keepalive
        engine.freeHoldMillis = freeScanTimeoutMillis + 5000
        return engine
    }
}
