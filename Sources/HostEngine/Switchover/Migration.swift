// One migration of a running QEMU VM, driven from start to release: the enlightened post-copy of the
// design (device state only through QEMU with x-ignore-shared, guest RAM through the engines), and QEMU's
// own postcopy and precopy as baselines over the same guest. Both QEMUs and both engines are on this
// host here (the engine channels and QEMU's stream go over loopback or a given address); the daemon
// that splits the two sides across hosts builds on the same steps.
//
// Order matters and is written down here because each step depends on the last:
//   1. destination engine listens for the shim; destination QEMU starts with -incoming defer and the
//      shim, which registers its RAM with a userfaultfd and hands it over before QEMU serves QMP;
//   2. both QEMUs get x-ignore-shared + events; destination migrate-incoming;
//   3. source migrate: QEMU stops the source (STOP) and sends device state only. From STOP the source
//      RAM file is final: the source QEMU is fenced (never cont'ed again) and the source engine starts
//      at once, pages the device-state load touches first;
//   4. destination RESUME: downtime = RESUME − STOP;
//   5. when every page is placed, the source engine has punched the whole file; the source QEMU is
//      killed and its file removed: T_release.

import CEpcopyLinux
import EpcopyProtocol
import Foundation
import Synchronization

public enum MigrationMode: String, Sendable, Codable, CaseIterable {
    /// External post-copy: device state through QEMU, RAM through epcopy's engines.
    case enlightened
    /// QEMU's own postcopy (postcopy-ram, migrate, migrate-start-postcopy at once).
    case postcopy
    /// QEMU's own precopy.
    case precopy
}

public struct MigrationResult: Sendable, Codable {
    public var mode: MigrationMode
    public var downtimeMillis: Double
    public var tReleaseMillis: Double
    public var bytesWire: UInt64
    public var faults: UInt64
    public var faultP50Micros: UInt64
    public var faultP99Micros: UInt64
    public var faultsBeforeResume: UInt64
    public var pagesCompared: UInt64
    public var mismatchedPages: UInt64
    /// How memory was verified: "digests" (every placed page against the source at STOP), or "guest"
    /// (QEMU's own modes: the guest's own verifier only).
    public var verification: String
    public var guestVerdict: String
    public var guestCounterBefore: Int?
    public var guestCounterAfter: Int?
    /// The guest agent answered (source hot report or destination free scan): enlightened post-copy. False:
    /// plain external post-copy with neighbour prefetch (nil in QEMU's own modes).
    public var enlightened: Bool?
    public var pagesByClass: [String: UInt64]?
    public var pagesSkippedFree: UInt64?
    /// Source: how long the switch waited for the hot report (asking and receiving it; ~0 for a kept one).
    public var agentReportMillis: Double?
    /// Source: age of the hot report at the switch when a daemon kept it in the background (nil: asked then).
    public var agentReportAgeMillis: Double?
    /// Destination: from RESUME's notice to the agent to having its free report.
    public var freeScanMillis: Double?
    public var pagesReportedFree: UInt64?
    /// Why the agent was not used, or what it got wrong.
    public var agentNotes: [String]?
    /// QEMU's STOP on the source and RESUME on the destination, wall clock (unix seconds; each host's clock).
    public var stopUnixSeconds: Double?
    public var resumeUnixSeconds: Double?

    enum CodingKeys: String, CodingKey {
        case mode
        case downtimeMillis = "downtime_ms"
        case tReleaseMillis = "t_release_ms"
        case bytesWire = "bytes_wire"
        case faults
        case faultP50Micros = "fault_p50_us"
        case faultP99Micros = "fault_p99_us"
        case faultsBeforeResume = "faults_before_resume"
        case pagesCompared = "pages_compared"
        case mismatchedPages = "mismatched_pages"
        case verification
        case guestVerdict = "guest_verdict"
        case guestCounterBefore = "guest_counter_before"
        case guestCounterAfter = "guest_counter_after"
        case enlightened
        case pagesByClass = "pages_by_class"
        case pagesSkippedFree = "pages_skipped_free"
        case agentReportMillis = "agent_report_ms"
        case agentReportAgeMillis = "agent_report_age_ms"
        case freeScanMillis = "free_scan_ms"
        case pagesReportedFree = "pages_reported_free"
        case agentNotes = "agent_notes"
        case stopUnixSeconds = "stop_unix_s"
        case resumeUnixSeconds = "resume_unix_s"
    }

    /// Every key always present (`--json` is a contract): what does not apply is null, and `enlightened` is false
    /// for QEMU's own modes.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(mode, forKey: .mode)
        try c.encode(downtimeMillis, forKey: .downtimeMillis)
        try c.encode(tReleaseMillis, forKey: .tReleaseMillis)
        try c.encode(bytesWire, forKey: .bytesWire)
        try c.encode(faults, forKey: .faults)
        try c.encode(faultP50Micros, forKey: .faultP50Micros)
        try c.encode(faultP99Micros, forKey: .faultP99Micros)
        try c.encode(faultsBeforeResume, forKey: .faultsBeforeResume)
        try c.encode(pagesCompared, forKey: .pagesCompared)
        try c.encode(mismatchedPages, forKey: .mismatchedPages)
        try c.encode(verification, forKey: .verification)
        try c.encode(guestVerdict, forKey: .guestVerdict)
        try c.encode(guestCounterBefore, forKey: .guestCounterBefore)
        try c.encode(guestCounterAfter, forKey: .guestCounterAfter)
        try c.encode(enlightened ?? false, forKey: .enlightened)
        try c.encode(pagesByClass, forKey: .pagesByClass)
        try c.encode(pagesSkippedFree, forKey: .pagesSkippedFree)
        try c.encode(agentReportMillis, forKey: .agentReportMillis)
        try c.encode(agentReportAgeMillis, forKey: .agentReportAgeMillis)
        try c.encode(freeScanMillis, forKey: .freeScanMillis)
        try c.encode(pagesReportedFree, forKey: .pagesReportedFree)
        try c.encode(agentNotes, forKey: .agentNotes)
        try c.encode(stopUnixSeconds, forKey: .stopUnixSeconds)
        try c.encode(resumeUnixSeconds, forKey: .resumeUnixSeconds)
    }
}

public enum MigrationError: Error, CustomStringConvertible {
    case step(String, any Error)
    case failed(String)

    public var description: String {
        switch self {
        case .step(let step, let error): "\(step): \(error)"
        case .failed(let text): text
        }
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

    /// Every capability a mode depends on, set both ways: a QEMU that arrived by one mode keeps that mode's
    /// capabilities (x-ignore-shared stays on after an enlightened migration, and QEMU refuses postcopy with it).
    public static func capabilities(for mode: MigrationMode) -> [String: Bool] {
        ["x-ignore-shared": mode == .enlightened, "postcopy-ram": mode == .postcopy, "events": true]
    }

    static func setCapabilities(_ qmp: QMPClient, _ capabilities: [String: Bool]) throws {
        let list = capabilities.map { QMPValue.object(["capability": .string($0.key), "state": .bool($0.value)]) }
        do { _ = try qmp.execute("migrate-set-capabilities", arguments: ["capabilities": .array(list)], timeout: .seconds(10)) }
        catch { throw MigrationError.step("migrate-set-capabilities", error) }
    }

    /// Guest-physical pages the device-state load reads: the ROM shadow and every virtqueue's rings.
    /// On q35 RAM below 4 GiB sits at the same RAM-file offset, where all of these live.
    static func devicePages(_ qmp: QMPClient, regionPages: UInt64) -> PageSet<PageIndex> {
        var pages = PageSet<PageIndex>()
        pages.insert(try! PageRange(start: PageIndex(rawValue: 0xC0), count: 3))  // 0xC0000-0xC2FFF
        guard let devices = try? qmp.execute("x-query-virtio", timeout: .seconds(5)).arrayValue else { return pages }
        for device in devices {
            guard let path = device["path"]?.stringValue,
                  let status = try? qmp.execute("x-query-virtio-status", arguments: ["path": .string(path)],
                                                timeout: .seconds(5)),
                  let queues = status["num-vqs"]?.intValue, queues > 0, queues < 1024
            else { continue }
            for queue in 0..<queues {
                guard let q = try? qmp.execute("x-query-virtio-queue-status",
                                                arguments: ["path": .string(path), "queue": .int(queue)],
                                                timeout: .seconds(5)),
                      let num = q["vring-num"]?.intValue, num > 0
                else { continue }
                for (key, size) in [("vring-desc", 16 * num), ("vring-avail", 6 + 2 * num), ("vring-used", 6 + 8 * num)] {
                    guard let address = q[key]?.intValue, address > 0,
                          let offset = ramOffset(guestPhysical: UInt64(address), regionPages: regionPages)
                    else { continue }
                    let first = offset >> PageGeometry.shift
                    let last = (offset + UInt64(size) - 1) >> PageGeometry.shift
                    guard last < regionPages else { continue }
                    pages.insert(try! PageRange(start: PageIndex(rawValue: first), count: last - first + 1))
                }
            }
        }
        return pages
    }

    /// Where a guest-physical address lives in the RAM file (q35 layout, see GuestRAMLayout); nil outside RAM.
    static func ramOffset(guestPhysical gpa: UInt64, regionPages: UInt64) -> UInt64? {
        GuestRAMLayout(regionPages: regionPages)
            .pageIndex(GuestFrameNumber(rawValue: gpa >> PageGeometry.shift))
            .map { ($0.rawValue << PageGeometry.shift) | (gpa & (PageGeometry.size - 1)) }
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

    /// The result of one migration from what each side saw. Downtime uses the two QEMUs' own event
    /// timestamps (each host's clock), so it holds when the sides run in different processes.
    public static func combine(source: SourceOutcome, destination: DestinationOutcome, destinationSide: DestinationSide,
                        options: MigrationOptions) -> MigrationResult {
        var comparison = MemoryComparison(pagesCompared: 0, mismatchedPages: 0, firstMismatches: [])
        let scan = destination.freeScan
        if let digests = destinationSide.engine?.digests, let sourceDigests = source.sourceDigests {
            // Pages the guest reported free after resume hold nothing the guest may read: every other page is
            // compared with the source as it was at STOP.
            comparison = digests.compare(sourceDigests: sourceDigests, free: scan?.free ?? PageSet())
        }
        let guest = GuestVerdict.watch(destinationSide.qemu, before: source.counterBefore, settle: options.settleSeconds)
        let report = destination.report
        return MigrationResult(
            mode: options.mode, downtimeMillis: (destination.resumeTimestamp - source.stopTimestamp) * 1000,
            tReleaseMillis: source.tReleaseMillis, bytesWire: source.bytesWire,
            faults: report?.metrics.faults ?? 0, faultP50Micros: report?.metrics.faultP50Micros ?? 0,
            faultP99Micros: report?.metrics.faultP99Micros ?? 0, faultsBeforeResume: destination.faultsBeforeResume,
            pagesCompared: comparison.pagesCompared, mismatchedPages: comparison.mismatchedPages,
            verification: options.mode == .enlightened && options.verify ? "digests" : "guest",
            guestVerdict: guest.verdict, guestCounterBefore: source.counterBefore, guestCounterAfter: guest.counterAfter,
            enlightened: options.mode == .enlightened ? (source.hotReport ?? false) || (scan?.answered ?? false) : nil,
            pagesByClass: source.pagesByClass, pagesSkippedFree: source.pagesSkippedFree,
            agentReportMillis: source.agentReportMillis, agentReportAgeMillis: source.agentReportAgeMillis,
            freeScanMillis: scan?.answered == true ? scan?.millis : nil,
            pagesReportedFree: scan?.answered == true ? scan?.free.count : nil,
            agentNotes: options.mode == .enlightened ? (source.agentNotes ?? []) + (scan?.notes ?? []) : nil,
            stopUnixSeconds: source.stopTimestamp, resumeUnixSeconds: destination.resumeTimestamp)
    }

    /// Bytes QEMU's own migration stream carried (device state, or all of RAM in its own modes).
    static func migrationBytes(_ qmp: QMPClient) -> UInt64 {
        guard let info = try? qmp.execute("query-migrate", timeout: .seconds(5)) else { return 0 }
        return UInt64(info["ram"]?["transferred"]?.intValue ?? 0)
    }

    public static func lastCounterForTests(_ log: String) -> Int? { GuestVerdict.lastCounter(log) }
    public static func ramOffsetForTests(_ gpa: UInt64, _ regionPages: UInt64) -> UInt64? {
        ramOffset(guestPhysical: gpa, regionPages: regionPages)
    }
}
