// What a transfer measured: fault latency (HdrHistogram: p99 needs the tail, not an average), bytes and
// pages per push class, and a timeline. Recorded from several threads, so every field is guarded;
// the fault path records one value per fault, which is cheap next to a network round trip.

import Histogram
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

public final class TransferMetrics: Sendable {
    private struct State {
        var faultLatency = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
        /// Faults whose page was already on its way in a bulk frame (the source sends a page once).
        var faultLatencyInFlight = Histogram<UInt64>(highestTrackableValue: 60_000_000,
                                                     numberOfSignificantValueDigits: .three)
        var pagesByClass: [PushClass: UInt64] = [:]
        var bytesByClass: [PushClass: UInt64] = [:]
    }

    private let state = Mutex(State())
    public let faults = Atomic<UInt64>(0)
    public let faultsZeroFilled = Atomic<UInt64>(0)
    public let faultsAlreadyPresent = Atomic<UInt64>(0)
    public let urgentPages = Atomic<UInt64>(0)
    public let bulkPages = Atomic<UInt64>(0)
    public let bytesWire = Atomic<UInt64>(0)

    /// Wall-clock times (seconds, CLOCK_REALTIME — the clock QMP event timestamps use) of the first faults, so a
    /// migration can count exactly the faults that came before QEMU's RESUME event.
    private let earlyFaults = Mutex<[Double]>([])
    /// Faults recorded so far (read without the lock, so the fault path stops paying for it once full).
    private let earlyFaultCount = Atomic<Int>(0)
    public static let earlyFaultLimit = 4096

    public init() {}

    /// Called by the fault path for every fault; keeps the first `earlyFaultLimit` times.
    public func recordFaultTime() {
        guard earlyFaultCount.add(1, ordering: .relaxed).oldValue < Self.earlyFaultLimit else { return }
        earlyFaults.withLock {
            guard $0.count < Self.earlyFaultLimit else { return }
            var ts = timespec()
            clock_gettime(CLOCK_REALTIME, &ts)
            $0.append(Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9)
        }
    }

    /// Faults seen before wall-clock time `seconds` (among the first `earlyFaultLimit`).
    public func faults(before seconds: Double) -> UInt64 {
        earlyFaults.withLock { times in UInt64(times.lazy.filter { $0 < seconds }.count) }
    }

    /// Latency from reading the fault to the page being placed (the faulting thread woken), in ns.
    public func recordFaultLatency(nanos: UInt64, viaBulk: Bool = false) {
        state.withLock {
            _ = $0.faultLatency.record(max(nanos / 1000, 1))
            if viaBulk { _ = $0.faultLatencyInFlight.record(max(nanos / 1000, 1)) }
        }
    }

    public func recordPushed(_ pushClass: PushClass, pages: UInt64) {
        state.withLock {
            $0.pagesByClass[pushClass, default: 0] += pages
            $0.bytesByClass[pushClass, default: 0] += pages * 4096
        }
    }

    public struct Snapshot: Sendable, Codable, Equatable {
        public var faults: UInt64
        public var faultsZeroFilled: UInt64
        public var faultsAlreadyPresent: UInt64
        public var latencySamples: UInt64
        public var faultP50Micros: UInt64
        public var faultP99Micros: UInt64
        public var faultMaxMicros: UInt64
        public var faultsResolvedByBulk: UInt64
        public var faultInFlightP50Micros: UInt64
        public var urgentPages: UInt64
        public var bulkPages: UInt64
        public var bytesWire: UInt64
        public var pagesByClass: [String: UInt64]

        enum CodingKeys: String, CodingKey {
            case faults
            case faultsZeroFilled = "faults_zero_filled"
            case faultsAlreadyPresent = "faults_already_present"
            case latencySamples = "fault_latency_samples"
            case faultP50Micros = "fault_p50_us"
            case faultP99Micros = "fault_p99_us"
            case faultMaxMicros = "fault_max_us"
            case faultsResolvedByBulk = "faults_resolved_by_bulk"
            case faultInFlightP50Micros = "fault_in_flight_p50_us"
            case urgentPages = "urgent_pages"
            case bulkPages = "bulk_pages"
            case bytesWire = "bytes_wire"
            case pagesByClass = "pages_by_class"
        }
    }

    public func snapshot() -> Snapshot {
        state.withLock { s in
            Snapshot(
                faults: faults.load(ordering: .relaxed),
                faultsZeroFilled: faultsZeroFilled.load(ordering: .relaxed),
                faultsAlreadyPresent: faultsAlreadyPresent.load(ordering: .relaxed),
                latencySamples: s.faultLatency.totalCount,
                faultP50Micros: s.faultLatency.totalCount == 0 ? 0 : s.faultLatency.valueAtPercentile(50),
                faultP99Micros: s.faultLatency.totalCount == 0 ? 0 : s.faultLatency.valueAtPercentile(99),
                faultMaxMicros: s.faultLatency.totalCount == 0 ? 0 : s.faultLatency.max,
                faultsResolvedByBulk: s.faultLatencyInFlight.totalCount,
                faultInFlightP50Micros: s.faultLatencyInFlight.totalCount == 0
                    ? 0 : s.faultLatencyInFlight.valueAtPercentile(50),
                urgentPages: urgentPages.load(ordering: .relaxed),
                bulkPages: bulkPages.load(ordering: .relaxed),
                bytesWire: bytesWire.load(ordering: .relaxed),
                pagesByClass: Dictionary(uniqueKeysWithValues: s.pagesByClass.map { ($0.key.description, $0.value) })
            )
        }
    }
}

/// A timeline of the transfer as JSON lines: one object per sample, so a run can be plotted.
public final class Timeline: Sendable {
    private let lines = Mutex<[String]>([])
    private let start: UInt64

    public init(start: UInt64 = monotonicNanos()) { self.start = start }

    public func sample(pagesPresent: UInt64, bytesReceived: UInt64, faults: UInt64, now: UInt64 = monotonicNanos()) {
        let ms = Double(now &- start) / 1e6
        let line = "{\"t_ms\":\(Int((ms * 10).rounded()) / 10),\"pages_present\":\(pagesPresent),"
            + "\"bytes\":\(bytesReceived),\"faults\":\(faults)}"
        lines.withLock { $0.append(line) }
    }

    public var jsonLines: [String] { lines.withLock { $0 } }
}
