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
        switch options.mode {
        case .enlightened: return try enlightened(source: source, options: options)
        case .postcopy, .precopy: return try qemuOwn(source: source, options: options)
        }
    }

    static func destinationConfig(for source: QEMUProcess, tag: String) -> QEMUConfig {
        var config = QEMUConfig(name: "\(source.config.name)-\(tag)", memoryMiB: source.config.memoryMiB,
                                vcpus: source.config.vcpus, deadlineSeconds: source.config.deadlineSeconds)
        config.kernel = source.config.kernel
        config.initrd = source.config.initrd
        config.append = source.config.append
        config.accel = source.config.accel
        config.incoming = true
        unlink(config.ramFile)
        return config
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
                    guard let address = q[key]?.intValue, address > 0 else { continue }
                    let first = UInt64(address) >> PageGeometry.shift
                    let last = (UInt64(address) + UInt64(size) - 1) >> PageGeometry.shift
                    guard last < regionPages else { continue }
                    pages.insert(try! PageRange(start: PageIndex(rawValue: first), count: last - first + 1))
                }
            }
        }
        return pages
    }

    static func enlightened(source: QEMUProcess, options: MigrationOptions) throws -> (MigrationResult, QEMUProcess) {
        let tag = "dst\(UInt32.random(in: 0...UInt32.max) % 100000)"
        var config = destinationConfig(for: source, tag: tag)
        let handoverPath = "/tmp/epcopy-\(config.name).handover"
        let migrationSocket = "/tmp/epcopy-\(config.name).mig"
        defer { unlink(migrationSocket) }
        config.environment = ["LD_PRELOAD": options.preloadLibrary, "EPCOPY_SHIM_SOCKET": handoverPath,
                              "EPCOPY_SHIM_PREFIX": config.ramFile]
        let session = UInt64.random(in: 1...UInt64.max)
        let regionPages = UInt64(source.config.memoryMiB) << 8

        // 1. The destination: shim hand-over first (QEMU blocks in mmap until the engine has its uffd).
        let handoverListener: UffdHandoverListener
        do { handoverListener = try UffdHandoverListener(path: handoverPath) } catch {
            throw MigrationError.step("destination: hand-over socket", error)
        }
        let accepted = Mutex<Result<DestinationEngine, any Error>?>(nil)
        let link = options.link
        let verify = options.verify
        let key = options.authKey
        let acceptThread = JoinableThread(name: "epcopy-handover") {
            let result = Result<DestinationEngine, any Error> {
                let handover = try handoverListener.accept(timeout: .seconds(60))
                let memory = try DestinationMemory(handover: handover)
                return DestinationEngine(memory: memory, options: DestinationOptions(
                    sessionID: session, link: link, recordDigests: verify, authKey: key))
            }
            accepted.withLock { $0 = result }
        }
        let destination: QEMUProcess
        do { destination = try QEMUProcess.launch(config, connectTimeout: .seconds(60)) } catch {
            acceptThread.join()
            throw MigrationError.step("destination: start QEMU", error)
        }
        acceptThread.join()
        let engine: DestinationEngine
        do { engine = try accepted.withLock { $0! }.get() } catch {
            throw MigrationError.step("destination: guest memory hand-over", error)
        }
        let listener: Listener
        do { listener = try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)) } catch {
            throw MigrationError.step("destination: listen", error)
        }
        let endpoint = listener.endpoint
        let listenerBox = ListenerHolder(listener)
        let destinationResult = Mutex<Result<DestinationReport, PeerError>?>(nil)
        let destinationThread = JoinableThread(name: "epcopy-dst") {
            let r = Result<DestinationReport, PeerError> { () throws(PeerError) in try engine.run(listener: listenerBox.listener) }
            destinationResult.withLock { $0 = r }
        }

        // 2. Device state only; the engines move RAM.
        try setCapabilities(source.qmp, ["x-ignore-shared": true, "events": true])
        try setCapabilities(destination.qmp, ["x-ignore-shared": true, "events": true])
        do {
            _ = try destination.qmp.execute("migrate-incoming", arguments: ["uri": .string("unix:\(migrationSocket)")],
                                            timeout: .seconds(10))
        } catch { throw MigrationError.step("destination: migrate-incoming", error) }
        let device = devicePages(source.qmp, regionPages: regionPages)
        let counterBefore = lastCounter(source.serialLog)

        // The source engine connects and authenticates while the VM still runs; it starts pushing at STOP.
        let sourceEngine: SourceEngine
        do {
            var sourceOptions = SourceOptions(
                sessionID: session, vmName: source.config.name, link: options.link, classes: [(.device, device)],
                releaseMemory: !options.verify, authKey: options.authKey)
            sourceOptions.holdBulkUntilReleased = true
            sourceEngine = try SourceEngine(ramFile: source.config.ramFile, options: sourceOptions)
        } catch { throw MigrationError.step("source engine", error) }
        let stopped = DispatchSemaphore(value: 0)
        let sourceResult = Mutex<Result<SourceReport, PeerError>?>(nil)
        let sourceDone = Atomic<UInt64>(0)
        let sourceThread = JoinableThread(name: "epcopy-src") {
            let r = Result<SourceReport, PeerError> { () throws(PeerError) in
                try sourceEngine.run(destination: endpoint, gate: { stopped.wait() })
            }
            sourceDone.store(monotonicNanos(), ordering: .releasing)
            sourceResult.withLock { $0 = r }
        }

        // 3. Switch.
        let start = monotonicNanos()
        do {
            _ = try source.qmp.execute("migrate", arguments: ["uri": .string("unix:\(migrationSocket)")],
                                       timeout: .seconds(10))
        } catch {
            stopped.signal()
            throw MigrationError.step("source: migrate", error)
        }
        let stop: QMPEvent
        do { stop = try source.qmp.waitForEvent("STOP", timeout: .seconds(60), after: start) } catch {
            stopped.signal()
            throw MigrationError.step("source: waiting for STOP", error)
        }
        // Fenced from here on: the source QEMU is never continued; its RAM file is final.
        source.keepRAMFile = true
        stopped.signal()

        // 4. Resume.
        let resume: QMPEvent
        do { resume = try destination.qmp.waitForEvent("RESUME", timeout: .seconds(120), after: start) } catch {
            throw MigrationError.step("destination: waiting for RESUME", error)
        }
        let faultsBeforeResume = engine.metrics.faults.load(ordering: .relaxed)
        sourceEngine.releaseBulk()
        Trace.log("migration: STOP +\((stop.receivedNanos - start) / 1000) us, RESUME +\((resume.receivedNanos - start) / 1000) us, "
                  + "faults before resume \(faultsBeforeResume); source events \(source.qmp.allEvents.map { "\($0.name)@\(($0.receivedNanos &- start) / 1000)" }); "
                  + "destination events \(destination.qmp.allEvents.map { "\($0.name)\($0.data["status"]?.stringValue ?? "")@\(($0.receivedNanos &- start) / 1000)" })")

        // 5. Transfer and release.
        sourceThread.join()
        destinationThread.join()
        let sourceReport: SourceReport
        let destinationReport: DestinationReport
        do {
            sourceReport = try sourceResult.withLock { $0! }.get()
            destinationReport = try destinationResult.withLock { $0! }.get()
        } catch { throw MigrationError.step("RAM transfer", error) }
        _ = try? source.qmp.waitForEvent("MIGRATION", timeout: .seconds(30), after: start) {
            $0.data["status"]?.stringValue == "completed"
        }
        var comparison = MemoryComparison(pagesCompared: 0, mismatchedPages: 0, firstMismatches: [])
        if options.verify, let digests = engine.digests {
            comparison = try compareWithSource(path: source.config.ramFile, digests: digests)
        }
        source.kill()
        source.waitForExit(timeout: .seconds(10))
        source.keepRAMFile = false
        source.teardown()
        let released = monotonicNanos()

        let (verdict, counterAfter) = guestVerdict(destination, before: counterBefore, settle: options.settleSeconds)
        let result = MigrationResult(
            mode: .enlightened, downtimeMillis: Double(resume.receivedNanos &- stop.receivedNanos) / 1e6,
            // With --verify the source keeps its pages until compared; release is when the engine was done.
            tReleaseMillis: Double((options.verify ? sourceDone.load(ordering: .acquiring) : released) - start) / 1e6,
            bytesWire: sourceReport.bytesWire + migrationBytes(source.qmp),
            faults: destinationReport.metrics.faults, faultP50Micros: destinationReport.metrics.faultP50Micros,
            faultP99Micros: destinationReport.metrics.faultP99Micros, faultsBeforeResume: faultsBeforeResume,
            pagesCompared: comparison.pagesCompared, mismatchedPages: comparison.mismatchedPages,
            verification: options.verify ? "digests" : "none", guestVerdict: verdict,
            guestCounterBefore: counterBefore, guestCounterAfter: counterAfter)
        return (result, destination)
    }

    /// Every page the destination placed against the source file as it was at STOP.
    static func compareWithSource(path: String, digests: PageDigests) throws -> MemoryComparison {
        do {
            let file = try FileDescriptor.open(path, O_RDONLY)
            let mapping = try MemoryMapping(file: file, length: Int(digests.pageCount << PageGeometry.shift),
                                            protection: PROT_READ)
            return digests.compare(source: UnsafeRawPointer(mapping.pointer))
        } catch { throw MigrationError.step("verify against the source", error) }
    }

    /// Bytes QEMU's own migration stream carried (device state, or all of RAM in its own modes).
    static func migrationBytes(_ qmp: QMPClient) -> UInt64 {
        guard let info = try? qmp.execute("query-migrate", timeout: .seconds(5)) else { return 0 }
        return UInt64(info["ram"]?["transferred"]?.intValue ?? 0)
    }

    static func qemuOwn(source: QEMUProcess, options: MigrationOptions) throws -> (MigrationResult, QEMUProcess) {
        let config = destinationConfig(for: source, tag: "dst\(UInt32.random(in: 0...UInt32.max) % 100000)")
        let migrationSocket = "/tmp/epcopy-\(config.name).mig"
        defer { unlink(migrationSocket) }
        let destination: QEMUProcess
        do { destination = try QEMUProcess.launch(config, connectTimeout: .seconds(60)) } catch {
            throw MigrationError.step("destination: start QEMU", error)
        }
        let postcopy = options.mode == .postcopy
        try setCapabilities(source.qmp, ["postcopy-ram": postcopy, "events": true])
        try setCapabilities(destination.qmp, ["postcopy-ram": postcopy, "events": true])
        do {
            _ = try destination.qmp.execute("migrate-incoming", arguments: ["uri": .string("unix:\(migrationSocket)")],
                                            timeout: .seconds(10))
        } catch { throw MigrationError.step("destination: migrate-incoming", error) }
        let counterBefore = lastCounter(source.serialLog)
        let start = monotonicNanos()
        do {
            _ = try source.qmp.execute("migrate", arguments: ["uri": .string("unix:\(migrationSocket)")],
                                       timeout: .seconds(10))
            if postcopy { _ = try source.qmp.execute("migrate-start-postcopy", timeout: .seconds(10)) }
        } catch { throw MigrationError.step("source: migrate", error) }
        let stop: QMPEvent
        let resume: QMPEvent
        do {
            stop = try source.qmp.waitForEvent("STOP", timeout: .seconds(300), after: start)
            resume = try destination.qmp.waitForEvent("RESUME", timeout: .seconds(300), after: start)
            _ = try source.qmp.waitForEvent("MIGRATION", timeout: .seconds(600), after: start) {
                let status = $0.data["status"]?.stringValue
                return status == "completed" || status == "failed"
            }
        } catch { throw MigrationError.step("waiting for the migration", error) }
        let bytes = migrationBytes(source.qmp)
        source.kill()
        source.waitForExit(timeout: .seconds(10))
        source.teardown()
        let released = monotonicNanos()
        let (verdict, counterAfter) = guestVerdict(destination, before: counterBefore, settle: options.settleSeconds)
        let result = MigrationResult(
            mode: options.mode, downtimeMillis: Double(resume.receivedNanos &- stop.receivedNanos) / 1e6,
            tReleaseMillis: Double(released - start) / 1e6, bytesWire: bytes, faults: 0, faultP50Micros: 0,
            faultP99Micros: 0, faultsBeforeResume: 0, pagesCompared: 0, mismatchedPages: 0,
            verification: "guest", guestVerdict: verdict, guestCounterBefore: counterBefore,
            guestCounterAfter: counterAfter)
        return (result, destination)
    }

    public static func lastCounterForTests(_ log: String) -> Int? { lastCounter(log) }

    /// The memory tester's last iteration counter in a serial log.
    static func lastCounter(_ log: String) -> Int? {
        var last: Int?
        // The serial console ends lines with "\r\n", a single Character in Swift: split on isNewline.
        for line in log.split(whereSeparator: \.isNewline) where line.hasPrefix("epcopy-memtest iter=") {
            let value = line.dropFirst("epcopy-memtest iter=".count).prefix { $0.isNumber }
            if let n = Int(value) { last = n }
        }
        return last
    }

    /// OK when the destination's tester goes on counting past the source's last count and never says
    /// CORRUPT; waits up to `settle` seconds for two new lines.
    static func guestVerdict(_ destination: QEMUProcess, before: Int?, settle: Double) -> (String, Int?) {
        let deadline = Date().addingTimeInterval(max(settle, 1) + 20)
        var after: Int?
        while Date() < deadline {
            let log = destination.serialLog
            if log.contains("CORRUPT") { return ("CORRUPT", lastCounter(log)) }
            after = lastCounter(log)
            if let after, let before, after >= before + 2 { return ("OK", after) }
            if before == nil, after != nil { return ("OK", after) }
            usleep(200_000)
        }
        return (after == nil ? "NO OUTPUT" : "STALLED", after)
    }
}
