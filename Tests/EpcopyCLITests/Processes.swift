// Test support for running epcopy's programs as separate processes: bounded waits, output captured,
// and every process this test started killed by PID when the test is done with it.

import EpcopyTestSupport
import Foundation
import Testing

/// The directory with the built products (epcopy, epcopy-memtouch, libEpcopyPreload.so).
let productsDirectory = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()

final class Spawned: @unchecked Sendable {
    let process = Process()
    private let out = Pipe()
    private let err = Pipe()
    private let lock = NSLock()
    private var stdoutData = Data()
    private var stderrData = Data()
    /// Output streams that have reached end of file (both: everything the process wrote has been read).
    private var closedStreams = 0
    let name: String

    init(_ name: String, _ executable: String, _ arguments: [String], environment: [String: String] = [:],
         prefix: [String] = []) throws {
        self.name = name
        if prefix.isEmpty {
            process.executableURL = URL(fileURLWithPath: executable)
            process.arguments = arguments
        } else {
            process.executableURL = URL(fileURLWithPath: prefix[0])
            process.arguments = Array(prefix.dropFirst()) + [executable] + arguments
        }
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        process.environment = env
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        out.fileHandleForReading.readabilityHandler = { [weak self] h in
            let d = h.availableData
            self?.lock.withLock {
                if d.isEmpty { self?.endOfStream(h) } else { self?.stdoutData.append(d) }
            }
        }
        err.fileHandleForReading.readabilityHandler = { [weak self] h in
            let d = h.availableData
            self?.lock.withLock {
                if d.isEmpty { self?.endOfStream(h) } else { self?.stderrData.append(d) }
            }
        }
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }
    var stdout: String { lock.withLock { String(decoding: stdoutData, as: UTF8.self) } }
    var stderr: String { lock.withLock { String(decoding: stderrData, as: UTF8.self) } }
    var isRunning: Bool { process.isRunning }

    /// Called under the lock when a stream reads end of file: stop watching it.
    private func endOfStream(_ handle: FileHandle) {
        handle.readabilityHandler = nil
        closedStreams += 1
    }

    /// Waits up to `seconds`; returns the exit status, or nil if it is still running. Once it has exited, also
    /// waits (a few seconds at most: a child it left behind may hold the pipes) until its output is all read.
    @discardableResult
    func wait(seconds: Double) -> Int32? {
        guard waitUntil(deadline: .seconds(seconds), poll: .milliseconds(20), { !process.isRunning }) else {
            return nil
        }
        waitUntil(deadline: .seconds(5), poll: .milliseconds(5)) { lock.withLock { closedStreams == 2 } }
        return process.terminationStatus
    }

    func kill(_ signal: Int32 = SIGKILL) {
        if process.isRunning { Foundation.kill(process.processIdentifier, signal) }
    }

    deinit {
        kill()
        process.waitUntilExit()
        out.fileHandleForReading.readabilityHandler = nil
        err.fileHandleForReading.readabilityHandler = nil
    }
}

/// Waits until `path` exists (a socket or file another process creates).
func waitForFile(_ path: String, seconds: Double) -> Bool {
    waitUntil(deadline: .seconds(seconds)) { FileManager.default.fileExists(atPath: path) }
}

/// A free TCP port on loopback (bound and released; good enough for tests run one at a time).
func freePort() -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        getsockname(fd, $0, &len) } }
    return UInt16(bigEndian: addr.sin_port)
}

/// Runs a command and returns its exit status (for ip netns set-up and tear-down).
@discardableResult
func sh(_ command: String) -> Int32 {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/sh")
    p.arguments = ["-c", command]
    p.standardOutput = FileHandle.nullDevice
    p.standardError = FileHandle.nullDevice
    try? p.run()
    p.waitUntilExit()
    return p.terminationStatus
}
