// Test support for running epcopy's programs as separate processes: bounded waits, output captured,
// and every process this test started killed by PID when the test is done with it.

import EpcopyTestSupport
import Foundation
import Testing

/// The directory with the built products (epcopy, epcopy-memtouch, libEpcopyPreload.so).
let productsDirectory = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()

/// A child's stdout and stderr, each read to end of file by a thread of its own: plain blocking reads, no
/// dispatch sources, so "all output read" is an event a wait can rely on. The threads keep this (and its
/// pipes) alive until the streams end, whatever happens to the Spawned that started them.
private final class CapturedOutput: @unchecked Sendable {
    // SAFETY (@unchecked): every field but the pipes is behind `lock`; the pipes are set once in init.
    let out = Pipe()
    let err = Pipe()
    private let lock = NSLock()
    private var data: [Data] = [Data(), Data()]
    private var ended = [false, false]

    func start() {
        for (index, pipe) in [out, err].enumerated() {
            Thread.detachNewThread { [self] in
                let fd = pipe.fileHandleForReading.fileDescriptor
                var buffer = [UInt8](repeating: 0, count: 65536)
                while true {
                    let n = read(fd, &buffer, buffer.count)
                    if n < 0, errno == EINTR { continue }
                    lock.withLock {
                        if n > 0 { data[index].append(contentsOf: buffer[0..<n]) } else { ended[index] = true }
                    }
                    if n <= 0 { break }
                }
            }
        }
    }

    var stdout: String { lock.withLock { String(decoding: data[0], as: UTF8.self) } }
    var stderr: String { lock.withLock { String(decoding: data[1], as: UTF8.self) } }
    var allRead: Bool { lock.withLock { ended[0] && ended[1] } }
}

final class Spawned: @unchecked Sendable {
    let process = Process()
    private let output = CapturedOutput()
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
        process.standardOutput = output.out
        process.standardError = output.err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        output.start()
    }

    var pid: Int32 { process.processIdentifier }
    var stdout: String { output.stdout }
    var stderr: String { output.stderr }
    var isRunning: Bool { exitStatus() == nil }

    /// The child's exit status (or the signal that ended it) as the kernel has it, nil while it runs. Asked with
    /// waitid(WNOWAIT), which leaves the child for Foundation to reap: Foundation's own notice of the exit was seen
    /// to never come (its SIGCHLD watch misses the signal when it lands on a thread that does not block it), and a
    /// test then hung until its deadline although the child had long exited.
    private func exitStatus() -> Int32? {
        var info = siginfo_t()
        guard waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 else {
            // Already reaped (by Foundation): its record has the status.
            return process.isRunning ? nil : process.terminationStatus
        }
        guard info._sifields._sigchld.si_pid == pid else { return nil }
        return info._sifields._sigchld.si_status
    }

    /// Waits up to `seconds`; returns the exit status, or nil if it is still running. Once it has exited, also
    /// waits (a few seconds at most: a child it left behind may hold the pipes) until its output is all read.
    @discardableResult
    func wait(seconds: Double) -> Int32? {
        guard waitUntil(deadline: .seconds(seconds), poll: .milliseconds(20), { exitStatus() != nil }) else {
            return nil
        }
        waitUntil(deadline: .seconds(5), poll: .milliseconds(5)) { output.allRead }
        return exitStatus()
    }

    func kill(_ signal: Int32 = SIGKILL) {
        if exitStatus() == nil { Foundation.kill(process.processIdentifier, signal) }
    }

    deinit {
        kill()
        // Not process.waitUntilExit(): it waits for the notice that may never come (see exitStatus).
        waitUntil(deadline: .seconds(10), poll: .milliseconds(10)) { exitStatus() != nil }
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
