// Duration to nanoseconds and seconds, as the QMP and QEMU deadlines need them (negative is zero).

/// Time conversions shared by the hypervisor files.
enum HypervisorTime {
    static func nanoseconds(_ d: Duration) -> UInt64 {
        let (s, atto) = d.components
        guard s >= 0 else { return 0 }
        return UInt64(s) * 1_000_000_000 + UInt64(max(atto, 0) / 1_000_000_000)
    }

    static func seconds(_ d: Duration) -> Double { Double(nanoseconds(d)) / 1e9 }
}
