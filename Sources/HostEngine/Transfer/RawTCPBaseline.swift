// The baseline every transfer figure is divided by: plain TCP between two threads on the same path,
// one stream, send() from a buffer and recv() into another, nothing else. Measured in the same run as
// the engine, so the ratio holds on a noisy shared machine.

import Synchronization
#if canImport(Glibc)
import Glibc
#endif

public enum RawTCPBaseline {
    public struct Result: Sendable {
        public var bytesPerSecond: Double
        /// CPU of the sending and receiving threads per GB moved.
        public var cpuSecondsPerGB: Double
    }

    /// Moves `bytes` over loopback (or `host`).
    public static func measure(bytes: Int, host: String = "127.0.0.1", chunk: Int = 4 << 20) throws -> Result {
        let receiverCPU = CPUCell()
        let listener = try TCP.listen(on: Endpoint(host: host, port: 0))
        let endpoint = listener.endpoint
        let receiver = JoinableThread(name: "raw-recv") { [listener = ListenerHolder(listener)] in
            defer { receiverCPU.add(threadCPUSeconds()) }
            guard let fd = try? TCP.accept(listener.listener, timeoutMillis: 10_000) else { return }
            TCP.setBufferSizes(fd.rawValue, bytes: 8 << 20)
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
            defer { buffer.deallocate() }
            var total = 0
            while total < bytes {
                let n = recv(fd.rawValue, buffer, chunk, 0)
                if n <= 0 { break }
                total += n
            }
        }
        let fd = try TCP.connect(to: endpoint, timeoutMillis: 10_000)
        TCP.setBufferSizes(fd.rawValue, bytes: 8 << 20)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        buffer.initializeMemory(as: UInt8.self, repeating: 0xA5, count: chunk)
        defer { buffer.deallocate() }
        let start = monotonicNanos()
        let senderCPUStart = threadCPUSeconds()
        var sent = 0
        while sent < bytes {
            try TCP.sendAll(fd.rawValue, UnsafeRawBufferPointer(start: buffer, count: min(chunk, bytes - sent)))
            sent += min(chunk, bytes - sent)
        }
        let senderCPU = threadCPUSeconds() - senderCPUStart
        receiver.join()
        let elapsed = Double(monotonicNanos() - start) / 1e9
        return Result(bytesPerSecond: Double(bytes) / elapsed,
                      cpuSecondsPerGB: (senderCPU + receiverCPU.value) / (Double(bytes) / 1e9))
    }
}

final class CPUCell: Sendable {
    private let seconds = Mutex<Double>(0)
    func add(_ value: Double) { seconds.withLock { $0 += value } }
    var value: Double { seconds.withLock { $0 } }
}

final class ListenerHolder: @unchecked Sendable {
    // SAFETY (@unchecked): the listener is only used by the one thread it is handed to.
    let listener: Listener
    init(_ listener: consuming Listener) { self.listener = listener }
}
