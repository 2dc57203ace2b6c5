// `epcopy bench engine`: the transfer core measured against plain TCP in the same run. A region with a
// known pattern is moved between a source and a destination engine on loopback while a toucher thread
// faults random pages, so the push and the fault path are measured together; afterwards every page
// of the destination is compared with the pattern.

import CEpcopyLinux
import EpcopyProtocol
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

public struct EngineBenchmarkResult: Codable, Sendable {
    public var sizeBytes: UInt64
    public var link: String
    public var rawTCPGbps: Double
    public var pushGbps: Double
    public var pushVsRaw: Double
    public var faultP50Micros: UInt64
    public var faultP99Micros: UInt64
    public var faults: UInt64
    /// Faults on pages already travelling in a bulk frame: they wait for that frame, not a round trip.
    public var faultsResolvedByBulk: UInt64
    public var faultInFlightP50Micros: UInt64
    public var touches: UInt64
    public var cpuSecondsPerGB: Double
    /// The same measure for the raw TCP baseline (its sender and receiver threads).
    public var rawTCPCPUSecondsPerGB: Double
    public var tReleaseMillis: Double
    public var transferMillis: Double
    public var pagesUrgent: UInt64
    public var pagesPushed: UInt64
    public var mismatchedPages: UInt64

    enum CodingKeys: String, CodingKey {
        case sizeBytes = "size_bytes"
        case link
        case rawTCPGbps = "raw_tcp_gbps"
        case pushGbps = "push_gbps"
        case pushVsRaw = "push_vs_raw"
        case faultP50Micros = "fault_p50_us"
        case faultP99Micros = "fault_p99_us"
        case faults
        case faultsResolvedByBulk = "faults_resolved_by_bulk"
        case faultInFlightP50Micros = "fault_in_flight_p50_us"
        case touches
        case cpuSecondsPerGB = "cpu_s_per_gb"
        case rawTCPCPUSecondsPerGB = "raw_tcp_cpu_s_per_gb"
        case tReleaseMillis = "t_release_ms"
        case transferMillis = "transfer_ms"
        case pagesUrgent = "pages_urgent"
        case pagesPushed = "pages_pushed"
        case mismatchedPages = "mismatched_pages"
    }
}

public enum EngineBenchmark {
    /// Runs both measurements. `touchIntervalMicros` paces the toucher (0: as fast as it can).
    public static func run(sizeBytes: UInt64, link: LinkSpec, seed: UInt64 = 0xBE7C,
                           touchIntervalMicros: UInt32 = 200) throws -> EngineBenchmarkResult {
        precondition(sizeBytes % PageGeometry.size == 0 && sizeBytes > 0)
        let pages = sizeBytes / PageGeometry.size
        let baseline = try RawTCPBaseline.measure(bytes: Int(min(sizeBytes, 2 << 30)))
        var raw = baseline.bytesPerSecond
        if let rate = link.bytesPerSecond { raw = min(raw, Double(rate)) }

        let tag = "epcopy-bench-\(getpid())"
        let sourcePath = "/dev/shm/\(tag)-src"
        let targetPath = "/dev/shm/\(tag)-dst"
        defer {
            unlink(sourcePath)
            unlink(targetPath)
        }
        try createFile(sourcePath, size: sizeBytes) { base in
            MemoryCompare.fillPattern(base, pages: pages, seed: seed)
        }
        try createFile(targetPath, size: sizeBytes, fill: nil)

        let targetFD = try FileDescriptor.open(targetPath, O_RDWR)
        let memory = try DestinationMemory.registerOwn(file: targetFD, length: Int(sizeBytes))
        let session = UInt64.random(in: 1...UInt64.max)
        let destination = DestinationEngine(memory: memory, options: DestinationOptions(sessionID: session, link: link))
        let base = destination.ownMappingAddress!
        let listener = ListenerHolder(try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)))
        let endpoint = listener.listener.endpoint
        let source = try SourceEngine(ramFile: sourcePath, options: SourceOptions(sessionID: session,
                                                                                   vmName: "bench", link: link))

        let done = Atomic<Bool>(false)
        let results = Mutex<(DestinationReport?, SourceReport?, PeerError?)>((nil, nil, nil))
        let toucherCPU = Mutex<Double>(0)
        let touches = Atomic<UInt64>(0)
        let badTouches = Atomic<UInt64>(0)
        let cpuStart = processCPUSeconds()
        let dst = JoinableThread(name: "bench-dst") {
            do throws(PeerError) {
                let report = try destination.run(listener: listener.listener)
                results.withLock { $0.0 = report }
            } catch { results.withLock { $0.2 = error } }
            done.store(true, ordering: .releasing)
        }
        let src = JoinableThread(name: "bench-src") {
            do throws(PeerError) {
                let report = try source.run(destination: endpoint)
                results.withLock { $0.1 = report }
            } catch { results.withLock { $0.2 = $0.2 ?? error } }
        }
        let toucher = JoinableThread(name: "bench-touch") {
            var rng = SystemRandomNumberGenerator()
            while !done.load(ordering: .acquiring) {
                let page = UInt64.random(in: 0..<pages, using: &rng)
                let address = UnsafeRawPointer(bitPattern: base + UInt(page << PageGeometry.shift))!
                if epc_pattern_check(address, page, 1, seed) >= 0 { badTouches.add(1, ordering: .relaxed) }
                touches.add(1, ordering: .relaxed)
                if touchIntervalMicros > 0 { usleep(touchIntervalMicros) }
            }
            let cpu = threadCPUSeconds()
            toucherCPU.withLock { $0 = cpu }
        }
        dst.join()
        src.join()
        toucher.join()
        _ = cpuStart
        _ = toucherCPU
        // The engines' own threads, as each engine accounts them (the benchmark's threads excluded).
        let (dstReport, srcReport, failure) = results.withLock { $0 }
        if let failure { throw failure }
        guard let dstReport, let srcReport else { throw PeerError.unexpected("benchmark: an engine returned nothing") }
        let cpu = dstReport.cpuSeconds + srcReport.cpuSeconds
        let comparison = MemoryCompare.comparePattern(actual: UnsafeRawPointer(bitPattern: base)!, pages: pages,
                                                      seed: seed)
        let seconds = dstReport.transferMillis / 1000
        let gbps = Double(sizeBytes) * 8 / 1e9 / seconds
        return EngineBenchmarkResult(
            sizeBytes: sizeBytes, link: link.description, rawTCPGbps: raw * 8 / 1e9, pushGbps: gbps,
            pushVsRaw: gbps / (raw * 8 / 1e9), faultP50Micros: dstReport.metrics.faultP50Micros,
            faultP99Micros: dstReport.metrics.faultP99Micros, faults: dstReport.metrics.faults,
            faultsResolvedByBulk: dstReport.metrics.faultsResolvedByBulk,
            faultInFlightP50Micros: dstReport.metrics.faultInFlightP50Micros,
            touches: touches.load(ordering: .relaxed), cpuSecondsPerGB: cpu / (Double(sizeBytes) / 1e9),
            rawTCPCPUSecondsPerGB: baseline.cpuSecondsPerGB,
            tReleaseMillis: srcReport.tReleaseMillis, transferMillis: dstReport.transferMillis,
            pagesUrgent: srcReport.pagesUrgent, pagesPushed: srcReport.pagesPushed,
            mismatchedPages: comparison.mismatchedPages + badTouches.load(ordering: .relaxed))
    }

    static func createFile(_ path: String, size: UInt64, fill: ((UnsafeMutableRawPointer) -> Void)?) throws {
        unlink(path)
        let fd = try FileDescriptor.open(path, O_RDWR | O_CREAT | O_EXCL)
        try fd.truncate(to: size)
        if let fill {
            let map = try MemoryMapping(file: fd, length: Int(size))
            fill(map.pointer)
        }
    }
}
