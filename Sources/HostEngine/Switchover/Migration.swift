// One migration of a running QEMU VM, composed from its two sides: the enlightened post-copy of the
// design (device state only through QEMU with x-ignore-shared, guest RAM through the engines), and QEMU's
// own postcopy and precopy as baselines over the same guest. `local` runs both sides on this host (the
// engine channels and QEMU's stream over loopback); the daemon runs the same sides on two hosts. The
// sides never call back into Migration: shared helpers live in QEMUMigration, DevicePages and Verify/.
//
// Order matters and is written down here because each step depends on the last:
//   1. DestinationSide prepare: the destination engine listens for the shim; the destination QEMU starts
//      with -incoming defer and the shim, which registers its RAM with a userfaultfd and hands it over
//      before QEMU serves QMP; x-ignore-shared + events; migrate-incoming;
//   2. SourceSide prepare: the same capabilities on the source; device pages and the agent's hot report
//      give the push order; the source engine connects and waits at its gate;
//   3. SourceSide switch: migrate; QEMU stops the source (STOP) and sends device state only. From STOP the
//      source RAM file is final: the source QEMU is fenced (never cont'ed again) and the push starts at
//      once, pages the device-state load touches first;
//   4. DestinationSide switch: RESUME (downtime = RESUME − STOP), then the agent's free scan;
//   5. drain on both sides: every page placed; SourceSide release: the source engine has punched the whole
//      file, the source QEMU is killed and its file removed: T_release;
//   6. the destination verifies placed pages and the guest, and the result is built from both outcomes.

import EpcopyProtocol

public enum Migration {
    /// Starts a VM under epcopy's management: RAM in a shared /dev/shm file, the agent port, QMP.
    public static func startVM(name: String, memoryMiB: Int, image: GuestImage,
                               deadlineSeconds: Double = 900) throws -> QEMUProcess {
        var config = QEMUConfig(name: name, memoryMiB: memoryMiB, deadlineSeconds: deadlineSeconds)
        config.kernel = image.kernel
        config.initrd = image.initrd
        config.append = image.append
        do { return try QEMUProcess.launch(config, connectTimeout: .seconds(30)) } catch {
            throw MigrationError.step("start VM \(name)", error)
        }
    }

    /// Migrates `source` to a new QEMU on this host; returns the result and the destination QEMU.
    public static func run(source: QEMUProcess, options: MigrationOptions) throws -> (MigrationResult, QEMUProcess) {
        try local(source: source, options: options)
    }

    /// Both sides on this host, over loopback.
    static func local(source: QEMUProcess, options: MigrationOptions) throws -> (MigrationResult, QEMUProcess) {
        let session = UInt64.random(in: 1...UInt64.max)
        let spec = VMSpec(source.config)
        // A VM migrated again keeps its base name: file and socket paths must not grow with every hop.
        let base = spec.name.components(separatedBy: "-dst").first ?? spec.name
        let destination = try DestinationSide(spec: spec, name: "\(base)-dst\(UInt32.random(in: 0...99999))",
                                              mode: options.mode, session: session, bindHost: "127.0.0.1",
                                              options: options)
        let sourceOutcome: SourceOutcome
        do {
            sourceOutcome = try SourceSide.migrate(source: source, mode: options.mode, session: session,
                                                   destinationURI: destination.migrationURI,
                                                   engineEndpoint: destination.engineEndpoint, options: options)
        } catch {
            destination.abandon()
            throw error
        }
        let destinationOutcome = try destination.finish()
        let result = combine(source: sourceOutcome, destination: destinationOutcome, destinationSide: destination,
                             options: options)
        return (result, destination.qemu)
    }

    /// The result of one migration from what each side saw: the destination checks its memory and guest against
    /// the source's outcome, and the result is built from the two outcomes and that check.
    public static func combine(source: SourceOutcome, destination: DestinationOutcome, destinationSide: DestinationSide,
                               options: MigrationOptions) -> MigrationResult {
        let check = destinationSide.verify(against: source, free: destination.freeScan?.free,
                                           settle: options.settleSeconds)
        return MigrationResult(options: options, source: source, destination: destination, check: check)
    }

    public static func lastCounterForTests(_ log: String) -> Int? { GuestVerdict.lastCounter(log) }
    public static func ramOffsetForTests(_ gpa: UInt64, _ regionPages: UInt64) -> UInt64? {
        DevicePages.ramOffset(guestPhysical: gpa, regionPages: regionPages)
    }
}
