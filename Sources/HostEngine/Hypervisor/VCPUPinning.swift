// Pinning a QEMU's vCPU threads to the CPUs of the NUMA node that holds its RAM (NumaBinding's other half, which
// needs the QMP client): the threads are query-cpus-fast's thread ids, each given sched_setaffinity.

import CEpcopyLinux
import Foundation

extension NumaBinding {
    /// Pins every vCPU thread of the QEMU behind `qmp` (query-cpus-fast's thread ids) to `cpus`; returns how many.
    public static func pinVCPUs(_ qmp: QMPClient, to cpus: [Int]) throws -> Int {
        guard !cpus.isEmpty else { throw NumaError("the node has no CPUs to run vCPUs on") }
        let threads = (try qmp.execute("query-cpus-fast", timeout: .seconds(5))).arrayValue ?? []
        var pinned = 0
        for thread in threads {
            guard let tid = thread["thread-id"]?.intValue, tid > 0 else { continue }
            let rc = cpus.map { Int32($0) }.withUnsafeBufferPointer { epc_set_affinity(Int32(tid), $0.baseAddress, Int32($0.count)) }
            guard rc == 0 else { throw NumaError("sched_setaffinity of vCPU thread \(tid): \(String(cString: strerror(-rc)))") }
            pinned += 1
        }
        return pinned
    }
}
