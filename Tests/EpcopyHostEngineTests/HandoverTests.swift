// The uffd hand-over end to end: a real program (epcopy-memtouch) runs under the real LD_PRELOAD shim,
// the real listener accepts its uffd, and a minimal fault loop here resolves every fault with the page
// pattern memtouch checks, so "OK" proves each byte the program read came through UFFDIO_COPY. The
// validation tests play a hostile shim against the listener; the takeover test resumes fault service
// through pidfd_getfd after dropping the handed-over descriptor.

import CEpcopyLinux
@testable import EpcopyHostEngine
import EpcopyTestSupport
import Foundation
import Glibc
import Testing

// MARK: - Fixtures

/// Binaries SwiftPM built next to this test bundle.
private enum Built {
    static let directory = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
    static let memtouch = directory.appendingPathComponent("epcopy-memtouch").path
    static let preload = directory.appendingPathComponent("libEpcopyPreload.so").path
}

private let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
/// Every test's files start with this, and it is what the shim is told to intercept.
private let shmPrefix = "/dev/shm/epcopy-handover-test-"

/// splitmix64's output function, as documented in Sources/MemToucher/main.c.
private func splitmix64(_ x: UInt64) -> UInt64 {
    var z = x &+ 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
}

/// Fills one page with memtouch's pattern for page `page`.
private func fillPattern(_ buffer: UnsafeMutableRawPointer, seed: UInt64, page: UInt64) {
    let words = buffer.bindMemory(to: UInt64.self, capacity: pageSize / 8)
    for w in 0..<(pageSize / 8) {
        words[w] = splitmix64(seed ^ (page << 20) ^ UInt64(w)).littleEndian
    }
}

private func uniqueName() -> String { "\(getpid())-\(UInt64.random(in: 0...UInt64.max))" }

/// A fresh guest-RAM stand-in under /dev/shm, removed when dropped.
private final class ShmFile {
    let path: String
    let size: Int

    init(size: Int) throws {
        path = shmPrefix + uniqueName()
        self.size = size
        let file = try FileDescriptor.open(path, O_RDWR | O_CREAT | O_EXCL)
        try file.truncate(to: UInt64(size))
    }

    deinit { unlink(path) }
}

/// A socket path for one test; the listener removes its file, this makes sure nothing is left anyway.
private final class SocketPath {
    let path = "/tmp/epcopy-handover-\(uniqueName()).sock"
    deinit { unlink(path) }
}

/// A child process with piped stdio, killed and reaped when dropped if it is still running.
private final class Child {
    let pid: pid_t
    private let stdinWriter: Int32
    private let stdoutReader: Int32
    private let stderrReader: Int32
    private(set) var waitStatus: Int32?

    init(_ path: String, _ arguments: [String], environment: [String: String]) throws {
        var fds = [Int32](repeating: -1, count: 6)
        // O_CLOEXEC: a child spawned by a concurrently running test must not inherit our pipe ends, or our
        // reads would never see EOF. dup2 in the file actions clears it on the child's 0/1/2.
        for i in 0..<3 {
            try fds.withUnsafeMutableBufferPointer { buffer throws(SyscallError) in
                _ = try Syscall.check("pipe2") { Syscall.negErrno(Int(pipe2(buffer.baseAddress! + 2 * i, O_CLOEXEC))) }
            }
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[0], 0)
        posix_spawn_file_actions_adddup2(&actions, fds[3], 1)
        posix_spawn_file_actions_adddup2(&actions, fds[5], 2)
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, nil, argv, envp)
        for fd in [fds[0], fds[3], fds[5]] { close(fd) }
        guard rc == 0 else {
            for fd in [fds[1], fds[2], fds[4]] { close(fd) }
            throw SyscallError(call: "posix_spawn(\(path))", errno: rc)
        }
        self.pid = pid
        stdinWriter = fds[1]
        stdoutReader = fds[2]
        stderrReader = fds[4]
    }

    deinit {
        if waitStatus == nil {
            kill(pid, SIGKILL)
            _ = wait(timeout: .seconds(10))
        }
        for fd in [stdinWriter, stdoutReader, stderrReader] { close(fd) }
    }

    /// The wait status if the child has exited (reaps it), else nil. Never blocks.
    func poll() -> Int32? {
        if waitStatus == nil {
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid { waitStatus = status }
        }
        return waitStatus
    }

    func wait(timeout: Duration) -> Int32? {
        waitUntil(deadline: timeout, poll: .milliseconds(5)) { poll() != nil }
        return waitStatus
    }

    /// The exit code, or nil if the child has not exited or was killed by a signal.
    var exitCode: Int32? {
        guard let status = waitStatus, status & 0x7f == 0 else { return nil }
        return (status >> 8) & 0xff
    }

    func sendByte() {
        var byte: UInt8 = 1
        #expect(write(stdinWriter, &byte, 1) == 1)
    }

    /// Everything the child wrote; only call once it has exited (reads until EOF).
    func output() -> (stdout: String, stderr: String) {
        (Self.drain(stdoutReader), Self.drain(stderrReader))
    }

    private static func drain(_ fd: Int32) -> String {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            bytes += chunk[..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Runs memtouch under the shim against `file`.
private func launchMemtouch(file: ShmFile, socket: String, seed: UInt64, extra: [String: String] = [:]) throws
    -> Child
{
    var env = [
        "LD_PRELOAD": Built.preload,
        "EPCOPY_SHIM_PREFIX": shmPrefix,
        "EPCOPY_SHIM_SOCKET": socket,
    ]
    env.merge(extra) { $1 }
    return try Child(Built.memtouch, [file.path, String(file.size), String(seed)], environment: env)
}

/// What the fault loop did.
private struct ServeStats {
    var copied = 0
    var zeroed = 0
    var continued = 0
    var alreadyPresent = 0
    var writeFaults = 0
    var faultingThreads: Set<UInt32> = []
}

/// The minimal engine: resolves every fault of `child` on the range until the child exits or `timeout`
/// passes (then the child is killed and an issue recorded). MISSING faults get the pattern page by
/// UFFDIO_COPY, or UFFDIO_ZEROPAGE for `zeroPages`; MINOR faults get UFFDIO_CONTINUE (the page cache
/// already holds the bytes). See man 2 ioctl_userfaultfd.
private func serveFaults(uffd: Int32, hva: UInt64, length: UInt64, seed: UInt64, zeroPages: Set<UInt64> = [],
                         child: Child, timeout: Duration = .seconds(60)) -> ServeStats {
    var stats = ServeStats()
    let deadline = ContinuousClock.now + timeout
    let messageSize = epc_uffd_msg_size()
    var messages = [UInt8](repeating: 0, count: messageSize * 64)
    let source = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: pageSize)
    defer { source.deallocate() }
    // Faults that got EAGAIN: the kernel refuses UFFDIO_COPY while the mm is changing (e.g. a remove
    // event is queued); they are retried after the next read.
    var retry: [(address: UInt64, flags: UInt64)] = []

    func resolve(_ address: UInt64, _ flags: UInt64) -> Bool {
        let page = (address - hva) / UInt64(pageSize)
        var done: Int64 = 0
        let rc: Int
        if flags & EPC_UFFD_PAGEFAULT_FLAG_MINOR != 0 {
            rc = epc_uffd_continue(uffd, address, UInt64(pageSize), 0, &done)
            if rc == 0 { stats.continued += 1 }
        } else if zeroPages.contains(page) {
            rc = epc_uffd_zeropage(uffd, address, UInt64(pageSize), 0, &done)
            if rc == 0 { stats.zeroed += 1 }
        } else {
            fillPattern(source, seed: seed, page: page)
            rc = epc_uffd_copy(uffd, address, UInt64(UInt(bitPattern: source)), UInt64(pageSize), 0, &done)
            if rc == 0 { stats.copied += 1 }
        }
        switch -rc {
        case 0:
            return true
        case Int(EEXIST):
            // Someone resolved the page first; the faulting thread may still sleep on it, so wake the range.
            stats.alreadyPresent += 1
            _ = epc_uffd_wake(uffd, address, UInt64(pageSize))
            return true
        case Int(EAGAIN):
            return false
        default:
            Issue.record("resolving 0x\(String(address, radix: 16)) failed: \(Errno.name(Int32(-rc)))")
            return true
        }
    }

    while child.poll() == nil {
        guard ContinuousClock.now < deadline else {
            Issue.record("the child did not finish within \(timeout); killing it")
            kill(child.pid, SIGKILL)
            _ = child.wait(timeout: .seconds(10))
            break
        }
        retry = retry.filter { !resolve($0.address, $0.flags) }
        var pfd = pollfd(fd: uffd, events: Int16(POLLIN), revents: 0)
        guard Glibc.poll(&pfd, 1, 20) > 0 else { continue }
        let n = read(uffd, &messages, messages.count)
        guard n > 0 else { continue } // EAGAIN: another reader (or a spurious wakeup) took it
        #expect(n % messageSize == 0, "uffd reads return whole messages")
        messages.withUnsafeBytes { raw in
            for offset in stride(from: 0, to: n, by: messageSize) {
                let message = raw.baseAddress! + offset
                guard epc_uffd_msg_event(message) == EPC_UFFD_EVENT_PAGEFAULT else { continue }
                let address = epc_uffd_msg_fault_address(message) & ~UInt64(pageSize - 1)
                let flags = epc_uffd_msg_fault_flags(message)
                guard address >= hva && address < hva + length else {
                    Issue.record("fault at 0x\(String(address, radix: 16)) outside the handed-over range")
                    continue
                }
                if flags & EPC_UFFD_PAGEFAULT_FLAG_WRITE != 0 { stats.writeFaults += 1 }
                stats.faultingThreads.insert(epc_uffd_msg_fault_tid(message))
                if !resolve(address, flags) { retry.append((address, flags)) }
            }
        }
    }
    return stats
}

// MARK: - End to end

@Suite(.tier(.linux)) struct HandoverEndToEndTests {
    @Test func missingModeHandOverServesEveryFault() throws {
        try runHandOver(mode: "missing", expectedMode: .missing, useMmap64: false)
    }

    @Test func missingPlusMinorModeHandOverServesEveryFault() throws {
        try runHandOver(mode: "missing+minor", expectedMode: [.missing, .minor], useMmap64: true)
    }

    /// memtouch under the shim, mapping `size` bytes; checks the hello against what really happened, then
    /// serves every fault and expects memtouch to find the pattern (and the zero pages) everywhere.
    private func runHandOver(mode: String, expectedMode: UffdRegisterMode, useMmap64: Bool) throws {
        let size = 8 << 20
        let pages = UInt64(size / pageSize)
        let seed = UInt64.random(in: 1...UInt64.max)
        let file = try ShmFile(size: size)
        let socket = SocketPath()
        let listener = try UffdHandoverListener(path: socket.path)
        let zeroPages: Set<UInt64> = [3, 100, 101, 102, pages - 1]
        let child = try launchMemtouch(file: file, socket: socket.path, seed: seed, extra: [
            "EPCOPY_UFFD_MODE": mode,
            "MEMTOUCH_ZERO_PAGES": "3,100-102,\(pages - 1)",
            "MEMTOUCH_MMAP64": useMmap64 ? "1" : "0",
        ])

        let handover = try listener.accept(timeout: .seconds(20))
        #expect(handover.pid == child.pid)
        #expect(handover.path == file.path)
        #expect(handover.length == UInt64(size))
        #expect(handover.fileOffset == 0)
        #expect(handover.hostVirtualAddress % UInt64(pageSize) == 0 && handover.hostVirtualAddress != 0)
        #expect(handover.registerMode == expectedMode)
        var features: UffdFeatures = [.missingShmem, .eventRemove, .threadID]
        if expectedMode.contains(.minor) { features.insert(.minorShmem) }
        #expect(handover.features == features)
        #expect(handover.ioctls.isSuperset(of: [.copy, .zeropage, .wake]))
        #expect(handover.ioctls.contains(.continue) == expectedMode.contains(.minor))
        #expect(handover.remoteUffdFD >= 0 && handover.remoteMemFD >= 0)
        #expect(UffdHandoverListener.linkTarget(of: handover.memFile.rawValue) == file.path)

        let stats = serveFaults(uffd: handover.uffd.rawValue, hva: handover.hostVirtualAddress,
                                length: handover.length, seed: seed, zeroPages: zeroPages, child: child)
        let output = child.output()
        #expect(child.exitCode == 0, "stdout: \(output.stdout) stderr: \(output.stderr)")
        #expect(output.stdout == "OK pages=\(pages)\n")
        #expect(output.stderr.isEmpty)
        // A fresh shmem file has no page in the page cache, so every page faulted exactly once as MISSING.
        #expect(stats.copied + stats.zeroed == Int(pages))
        #expect(stats.zeroed == zeroPages.count)
        #expect(stats.continued == 0)
        #expect(stats.writeFaults > 0, "memtouch's CAS touches must fault as writes")
        // UFFD_FEATURE_THREAD_ID: memtouch is single-threaded, so the faulting thread is its main thread.
        #expect(stats.faultingThreads == [UInt32(child.pid)])
    }

    @Test func withoutAnEngineTheShimFailsTheMmapLoudly() throws {
        let file = try ShmFile(size: 1 << 20)
        let socket = SocketPath() // nobody listens here
        let child = try launchMemtouch(file: file, socket: socket.path, seed: 1)
        #expect(child.wait(timeout: .seconds(20)) != nil)
        let output = child.output()
        #expect(child.exitCode == 2)
        #expect(!output.stdout.contains("OK"))
        let lines = output.stderr.split(separator: "\n")
        #expect(lines.first == "epcopy-preload: no engine at \(socket.path): connect: No such file or directory",
                "stderr: \(output.stderr)")
        #expect(lines.contains { $0.hasPrefix("memtouch: mmap \(file.path)") })
    }

    /// EPCOPY_SHIM_OPTIONAL (a libvirt domain's definition carries the shim on every boot): with nobody at the
    /// socket the mapping stays ordinary memory and the program runs; an engine that is there but silent still
    /// fails the mmap, as without the option.
    @Test func anOptionalShimLeavesTheMappingAloneOnlyWhenNoEngineIsThere() throws {
        let file = try ShmFile(size: 1 << 20)
        let socket = SocketPath() // nobody listens here
        let alone = try Child(Built.memtouch, [file.path, String(file.size), "5", "--verify-only"], environment: [
            "LD_PRELOAD": Built.preload, "EPCOPY_SHIM_PREFIX": shmPrefix, "EPCOPY_SHIM_SOCKET": socket.path,
            "EPCOPY_SHIM_OPTIONAL": "1", "MEMTOUCH_ZERO_PAGES": "0-255",
        ])
        #expect(alone.wait(timeout: .seconds(20)) != nil)
        let output = alone.output()
        #expect(alone.exitCode == 0, "stderr: \(output.stderr)")
        #expect(output.stdout == "OK pages=256\n")
        #expect(output.stderr.contains("stays ordinary memory (EPCOPY_SHIM_OPTIONAL)"), "stderr: \(output.stderr)")

        let listener = try UffdHandoverListener(path: socket.path) // listens, never accepts
        let silent = try launchMemtouch(file: file, socket: socket.path, seed: 1,
                                        extra: ["EPCOPY_SHIM_TIMEOUT_MS": "300", "EPCOPY_SHIM_OPTIONAL": "1"])
        #expect(silent.wait(timeout: .seconds(20)) != nil)
        #expect(silent.exitCode == 2, "stderr: \(silent.output().stderr)")
        withExtendedLifetime(listener) {}
    }

    @Test func anEngineThatNeverRepliesMakesTheShimTimeOut() throws {
        let file = try ShmFile(size: 1 << 20)
        let socket = SocketPath()
        let listener = try UffdHandoverListener(path: socket.path) // listens, never accepts
        let start = ContinuousClock.now
        let child = try launchMemtouch(file: file, socket: socket.path, seed: 1,
                                       extra: ["EPCOPY_SHIM_TIMEOUT_MS": "300"])
        #expect(child.wait(timeout: .seconds(20)) != nil)
        #expect(ContinuousClock.now - start >= .milliseconds(300))
        let output = child.output()
        #expect(child.exitCode == 2)
        #expect(output.stderr.hasPrefix("epcopy-preload: no reply from engine at \(socket.path) within 300 ms"),
                "stderr: \(output.stderr)")
        withExtendedLifetime(listener) {}
    }

    @Test func otherSharedMappingsAreLeftAlone() throws {
        // The prefix does not match this file, so the shim must not contact the (absent) engine at all.
        let file = try ShmFile(size: 1 << 20)
        let child = try Child(Built.memtouch, [file.path, String(file.size), "5", "--verify-only"], environment: [
            "LD_PRELOAD": Built.preload,
            "EPCOPY_SHIM_PREFIX": "/dev/shm/some-other-prefix-",
            "EPCOPY_SHIM_SOCKET": "/nonexistent/engine.sock",
            "MEMTOUCH_ZERO_PAGES": "0-255",
        ])
        #expect(child.wait(timeout: .seconds(20)) != nil)
        let output = child.output()
        #expect(child.exitCode == 0, "stderr: \(output.stderr)")
        #expect(output.stdout == "OK pages=256\n")
    }

    /// Models an engine that dies in the middle of a fault: it reads the first fault message, then all its
    /// descriptors close. The shim's copy keeps the uffd registered, so the program must stay blocked (not
    /// read zeros) until a new engine takes the uffd over with pidfd_getfd and serves it.
    @Test func takenOverUffdServesFaultsAfterTheEngineThatHeldItIsGone() throws {
        let size = 4 << 20
        let seed = UInt64.random(in: 1...UInt64.max)
        let file = try ShmFile(size: size)
        let socket = SocketPath()
        let listener = try UffdHandoverListener(path: socket.path)
        let child = try launchMemtouch(file: file, socket: socket.path, seed: seed,
                                       extra: ["MEMTOUCH_WAIT_STDIN": "1"])

        let pid: Int32
        let remoteFD: Int32
        let hva: UInt64
        let length: UInt64
        var firstFault: UInt64 = 0
        do {
            let handover = try listener.accept(timeout: .seconds(20))
            (pid, remoteFD, hva, length) = (handover.pid, handover.remoteUffdFD, handover.hostVirtualAddress,
                                            handover.length)
            child.sendByte()
            var pfd = pollfd(fd: handover.uffd.rawValue, events: Int16(POLLIN), revents: 0)
            #expect(poll(&pfd, 1, 10_000) == 1, "memtouch's first touch must fault")
            var message = [UInt8](repeating: 0, count: epc_uffd_msg_size())
            #expect(read(handover.uffd.rawValue, &message, message.count) == message.count)
            #expect(epc_uffd_msg_event(message) == EPC_UFFD_EVENT_PAGEFAULT)
            firstFault = epc_uffd_msg_fault_address(message)
            // `handover` ends here: the engine's descriptors close with the fault read but unresolved.
        }

        // The event that would prove it wrong: memtouch exiting (it exits as soon as a read goes through).
        #expect(!waitUntil(deadline: .milliseconds(300)) { child.poll() != nil },
                "with the engine gone the fault must block, not resolve to zeros")

        let taken = try UffdHandoverListener.takeOver(pid: pid, remoteFD: remoteFD)
        // A fault message is delivered once: the one the dead engine read is not offered again, so the new
        // owner sees nothing until it wakes the range and the blocked thread faults afresh.
        var pfd = pollfd(fd: taken.rawValue, events: Int16(POLLIN), revents: 0)
        #expect(poll(&pfd, 1, 200) == 0, "a fault message already read is not re-delivered")
        #expect(epc_uffd_wake(taken.rawValue, hva, length) == 0)
        pfd.revents = 0
        #expect(poll(&pfd, 1, 10_000) == 1, "UFFDIO_WAKE makes the blocked thread fault again")

        let stats = serveFaults(uffd: taken.rawValue, hva: hva, length: length, seed: seed, child: child)
        let output = child.output()
        #expect(child.exitCode == 0, "stdout: \(output.stdout) stderr: \(output.stderr)")
        #expect(output.stdout == "OK pages=\(size / pageSize)\n")
        #expect(stats.copied == size / pageSize)
        #expect(firstFault >= hva && firstFault < hva + length)
    }

    @Test func memtouchDetectsCorruptionAndHonoursZeroPages() throws {
        // Guards the end-to-end tests: "OK" only means something if memtouch catches a wrong word.
        let size = 1 << 20
        let seed: UInt64 = 0xE9C0_9E5E_ED00_0001
        let file = try ShmFile(size: size)
        do {
            let fd = try FileDescriptor.open(file.path, O_RDWR)
            let map = try MemoryMapping(file: fd, length: size)
            for page in 0..<UInt64(size / pageSize) {
                fillPattern(map.pointer + Int(page) * pageSize, seed: seed, page: page)
            }
            memset(map.pointer + 9 * pageSize, 0, pageSize) // page 9 is declared zero below
            map.pointer.storeBytes(of: UInt64(0xBAD), toByteOffset: 5 * pageSize + 7 * 8, as: UInt64.self)
        }
        let clean = try Child(Built.memtouch, [file.path, String(size), String(seed), "--verify-only"],
                              environment: ["MEMTOUCH_ZERO_PAGES": "9"])
        #expect(clean.wait(timeout: .seconds(20)) != nil)
        let cleanOutput = clean.output()
        #expect(clean.exitCode == 1)
        let expected = splitmix64(seed ^ (5 << 20) ^ 7)
        let hex = String(expected, radix: 16)
        #expect(cleanOutput.stdout
            == "CORRUPT page=5 word=7 expected=0x\(String(repeating: "0", count: 16 - hex.count) + hex) "
            + "got=0x0000000000000bad\n")

        let wrongZero = try Child(Built.memtouch, [file.path, String(size), String(seed), "--verify-only"],
                                  environment: ["MEMTOUCH_ZERO_PAGES": "0-1"])
        #expect(wrongZero.wait(timeout: .seconds(20)) != nil)
        #expect(wrongZero.exitCode == 1)
        #expect(wrongZero.output().stdout.hasPrefix("CORRUPT page=0 word=0 expected=0x0000000000000000 "))
    }
}

// MARK: - Validation

/// Memory of this test process registered with a real uffd: the ingredients of a valid hello.
private final class LocalRegistration {
    let file: FileDescriptor
    let map: MemoryMapping
    let uffd: Userfaultfd
    let ioctls: UffdIoctls
    static let size = 2 << 20

    init() throws {
        file = try FileDescriptor.memfd(name: "epcopy-handover-test")
        try file.truncate(to: UInt64(Self.size))
        map = try MemoryMapping(file: file, length: Self.size)
        uffd = try Userfaultfd(features: [.missingShmem, .eventRemove, .threadID])
        ioctls = try uffd.register(start: map.address, length: Self.size, mode: .missing)
    }

    func hello() -> epc_handover_hello {
        var hello = epc_handover_hello()
        hello.magic = EPC_HANDOVER_MAGIC
        hello.version = UInt16(EPC_HANDOVER_VERSION)
        hello.flags = 0
        hello.pid = getpid()
        hello.uffd_fd = uffd.descriptor.rawValue
        hello.mem_fd = file.rawValue
        hello.reg_mode = UInt32(UffdRegisterMode.missing.rawValue)
        hello.features = uffd.features.rawValue
        hello.hva = UInt64(map.address)
        hello.length = UInt64(Self.size)
        hello.file_offset = 0
        hello.ioctls = ioctls.rawValue
        setPath(&hello, Array("/memfd:epcopy-handover-test (deleted)".utf8) + [0])
        return hello
    }

    var descriptors: [Int32] { [uffd.descriptor.rawValue, file.rawValue] }
}

private func setPath(_ hello: inout epc_handover_hello, _ bytes: [UInt8]) {
    withUnsafeMutableBytes(of: &hello.path) { path in
        path.initializeMemory(as: UInt8.self, repeating: 0)
        path.copyBytes(from: bytes.prefix(path.count))
    }
}

/// A client that plays the shim: connects, sends `bytes` of `hello` with `fds`.
private final class FakeShim {
    let socket: FileDescriptor

    init(connectingTo path: String, hello: epc_handover_hello, bytes: Int? = nil, fds: [Int32]) throws {
        let raw = try Syscall.check("connect(\(path))") { Int(epc_unix_seqpacket_connect(path)) }
        socket = FileDescriptor(adopting: Int32(raw))
        var hello = hello
        let count = bytes ?? MemoryLayout<epc_handover_hello>.size
        let sent = withUnsafeBytes(of: &hello) { buffer in
            fds.withUnsafeBufferPointer { epc_send_with_fds(socket.rawValue, buffer.baseAddress, count,
                                                            $0.baseAddress, Int32($0.count)) }
        }
        #expect(sent == count)
    }

    /// The engine's reply status, waiting at most five seconds for it.
    func replyStatus() -> Int32? {
        var pfd = pollfd(fd: socket.rawValue, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 5_000) == 1 else { return nil }
        var reply = epc_handover_reply()
        let n = withUnsafeMutableBytes(of: &reply) { recv(socket.rawValue, $0.baseAddress, $0.count, 0) }
        guard n == MemoryLayout<epc_handover_reply>.size, reply.magic == EPC_HANDOVER_MAGIC else { return nil }
        return reply.status
    }
}

/// Ways a hello can be wrong, with the words the rejection must contain and the errno the shim must hear.
enum HostileHello: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case badMagic, badVersion, nonZeroFlags, shortRecord, zeroLength, lengthNotPageAligned, addressNotPageAligned
    case offsetNotPageAligned, onlyOneDescriptor, threeDescriptors, uffdIsNotAUserfaultfd, ramFileTooSmall
    case pathNotTerminated, pathNotUTF8, pidOfAnotherProcess, modeWithoutMissing

    var testDescription: String { rawValue }

    var expectation: (text: String, status: Int32) {
        switch self {
        case .badMagic: ("bad magic 0x4d554e4b", EPROTO)
        case .badVersion: ("protocol version 2", EPROTONOSUPPORT)
        case .nonZeroFlags: ("flags 0x1 must be 0", EINVAL)
        case .shortRecord: ("the hello is 100 bytes, expected 320", EMSGSIZE)
        case .zeroLength: ("length 0", EINVAL)
        case .lengthNotPageAligned: ("length 4097 is not page aligned", EINVAL)
        case .addressNotPageAligned: ("is not page aligned", EINVAL)
        case .offsetNotPageAligned: ("file offset 100 is not page aligned", EINVAL)
        case .onlyOneDescriptor: ("expected 2 descriptors (the uffd and the RAM file), received 1", EINVAL)
        case .threeDescriptors: ("expected 2 descriptors (the uffd and the RAM file), received 3", EINVAL)
        case .uffdIsNotAUserfaultfd: ("descriptor 0 is /memfd:epcopy-handover-test (deleted), not a userfaultfd",
                                      EINVAL)
        case .ramFileTooSmall: ("the RAM file is 2097152 bytes, smaller than offset 0 + length 4194304", EINVAL)
        case .pathNotTerminated: ("path is not NUL-terminated", EINVAL)
        case .pathNotUTF8: ("path is not valid UTF-8", EINVAL)
        case .pidOfAnotherProcess: ("pid 1 is not the connecting process", EINVAL)
        case .modeWithoutMissing: ("lacks MISSING", EINVAL)
        }
    }

    /// Sends this variant of `local`'s valid hello to `path`.
    fileprivate func send(to path: String, from local: LocalRegistration) throws -> FakeShim {
        var hello = local.hello()
        var fds = local.descriptors
        var bytes: Int?
        switch self {
        case .badMagic: hello.magic = 0x4D55_4E4B
        case .badVersion: hello.version = 2
        case .nonZeroFlags: hello.flags = 1
        case .shortRecord: bytes = 100
        case .zeroLength: hello.length = 0
        case .lengthNotPageAligned: hello.length = 4097
        case .addressNotPageAligned: hello.hva += 1
        case .offsetNotPageAligned: hello.file_offset = 100
        case .onlyOneDescriptor: fds = [fds[0]]
        case .threeDescriptors: fds.append(fds[1])
        case .uffdIsNotAUserfaultfd: fds = [fds[1], fds[1]]
        case .ramFileTooSmall: hello.length = UInt64(2 * LocalRegistration.size)
        case .pathNotTerminated: setPath(&hello, [UInt8](repeating: 0x61, count: 256))
        case .pathNotUTF8: setPath(&hello, [0x2F, 0xFF, 0xFE, 0])
        case .pidOfAnotherProcess: hello.pid = 1
        case .modeWithoutMissing: hello.reg_mode = UInt32(UffdRegisterMode.minor.rawValue)
        }
        return try FakeShim(connectingTo: path, hello: hello, bytes: bytes, fds: fds)
    }
}

@Suite(.tier(.linux)) struct HandoverValidationTests {
    @Test(arguments: HostileHello.allCases)
    func hostileHelloIsRejectedAndTheShimIsToldWhy(_ variant: HostileHello) throws {
        let local = try LocalRegistration()
        let socket = SocketPath()
        let listener = try UffdHandoverListener(path: socket.path)
        let shim = try variant.send(to: socket.path, from: local)
        do {
            _ = try listener.accept(timeout: .seconds(5))
            Issue.record("accepted a hello with \(variant)")
        } catch {
            guard case .invalidHello(let why) = error else {
                Issue.record("expected invalidHello, got \(error)")
                return
            }
            #expect(why.contains(variant.expectation.text), "\(error)")
            #expect(error.description.hasPrefix("rejected a uffd hand-over: "))
        }
        #expect(shim.replyStatus() == variant.expectation.status)
    }

    @Test func listenerKeepsWorkingAfterRejectingHostileHellos() throws {
        let local = try LocalRegistration()
        let socket = SocketPath()
        let listener = try UffdHandoverListener(path: socket.path)
        for variant in [HostileHello.badMagic, .lengthNotPageAligned, .onlyOneDescriptor] {
            let shim = try variant.send(to: socket.path, from: local)
            #expect(throws: HandoverError.self) { _ = try listener.accept(timeout: .seconds(5)) }
            #expect(shim.replyStatus() == variant.expectation.status)
        }

        let shim = try FakeShim(connectingTo: socket.path, hello: local.hello(), fds: local.descriptors)
        let handover = try listener.accept(timeout: .seconds(5))
        #expect(shim.replyStatus() == 0)
        #expect(handover.pid == getpid())
        #expect(handover.remoteUffdFD == local.uffd.descriptor.rawValue)
        #expect(handover.remoteMemFD == local.file.rawValue)
        #expect(handover.hostVirtualAddress == UInt64(local.map.address))
        #expect(handover.length == UInt64(LocalRegistration.size))
        #expect(handover.registerMode == .missing)
        #expect(handover.ioctls == local.ioctls)
        #expect(handover.path == "/memfd:epcopy-handover-test (deleted)")
        // SCM_RIGHTS installs new descriptors for the same open files (man 7 unix).
        #expect(handover.uffd.rawValue != local.uffd.descriptor.rawValue)
        #expect(UffdHandoverListener.linkTarget(of: handover.uffd.rawValue) == UffdHandoverListener.userfaultfdLink)
        #expect(fcntl(handover.uffd.rawValue, F_GETFD) & FD_CLOEXEC != 0, "received descriptors must be CLOEXEC")
    }

    @Test func aPeerThatHangsUpOrStaysSilentIsReportedNotWaitedOn() throws {
        let socket = SocketPath()
        let listener = try UffdHandoverListener(path: socket.path)
        let noShim = #expect(throws: HandoverError.self) { _ = try listener.accept(timeout: .milliseconds(100)) }
        guard case .timedOut(let what) = noShim else {
            Issue.record("expected timedOut, got \(String(describing: noShim))")
            return
        }
        #expect(what.hasPrefix("a shim to connect to \(socket.path) (is the program running with LD_PRELOAD="))

        do {
            let raw = try Syscall.check("connect") { Int(epc_unix_seqpacket_connect(socket.path)) }
            _ = FileDescriptor(adopting: Int32(raw)) // connects and hangs up at once
        }
        #expect(throws: HandoverError.peerClosed) { _ = try listener.accept(timeout: .seconds(5)) }

        let raw = try Syscall.check("connect") { Int(epc_unix_seqpacket_connect(socket.path)) }
        let silent = FileDescriptor(adopting: Int32(raw))
        let start = ContinuousClock.now
        #expect(throws: HandoverError.timedOut(waitingFor: "the shim's hello on \(socket.path)")) {
            _ = try listener.accept(timeout: .milliseconds(200))
        }
        #expect(ContinuousClock.now - start >= .milliseconds(200))
        // The engine still tells a slow shim why it gave up.
        var reply = epc_handover_reply()
        let n = withUnsafeMutableBytes(of: &reply) {
            recv(silent.rawValue, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT))
        }
        #expect(n == MemoryLayout<epc_handover_reply>.size && reply.status == ETIMEDOUT)
    }

    @Test func socketFileIsPrivateAndOnlyAStaleOneIsReplaced() throws {
        let socket = SocketPath()
        do {
            let listener = try UffdHandoverListener(path: socket.path)
            var st = stat()
            #expect(lstat(socket.path, &st) == 0)
            #expect(st.st_mode & 0o777 == 0o600)
            // A second engine on the same path must not steal it from a live one.
            #expect(throws: HandoverError.unusableSocketPath("another process is listening on \(socket.path)")) {
                _ = try UffdHandoverListener(path: socket.path)
            }
            withExtendedLifetime(listener) {}
        }
        var st = stat()
        #expect(lstat(socket.path, &st) != 0, "the listener removes its socket file when it goes away")

        // A socket file nobody listens on any more (an engine that was killed): replaced.
        let raw = try Syscall.check("bind") { Int(epc_unix_seqpacket_bind(socket.path)) }
        _ = FileDescriptor(adopting: Int32(raw))
        #expect(lstat(socket.path, &st) == 0)
        _ = try UffdHandoverListener(path: socket.path)

        // Anything that is not a socket is left alone.
        let regular = try ShmFile(size: 4096)
        let notASocket = HandoverError.unusableSocketPath("\(regular.path) exists and is not a socket; not removing it")
        #expect(throws: notASocket) { _ = try UffdHandoverListener(path: regular.path) }
        #expect(lstat(regular.path, &st) == 0)
    }

    @Test func takeOverChecksWhatItTakes() throws {
        let local = try LocalRegistration()
        let taken = try UffdHandoverListener.takeOver(pid: getpid(), remoteFD: local.uffd.descriptor.rawValue)
        #expect(UffdHandoverListener.linkTarget(of: taken.rawValue) == UffdHandoverListener.userfaultfdLink)
        #expect(fcntl(taken.rawValue, F_GETFD) & FD_CLOEXEC != 0)

        #expect(throws: HandoverError.self) {
            _ = try UffdHandoverListener.takeOver(pid: getpid(), remoteFD: local.file.rawValue)
        }
        do {
            _ = try UffdHandoverListener.takeOver(pid: getpid(), remoteFD: local.file.rawValue)
        } catch {
            guard case .notAUserfaultfd(let what) = error else { throw error }
            #expect(what.hasPrefix("descriptor \(local.file.rawValue) of pid \(getpid())"))
        }
        // A descriptor number the target does not have is an answer about the target, not a crash here.
        #expect(throws: HandoverError.syscall(SyscallError(call: "pidfd_getfd(pid \(getpid()), fd 999999)",
                                                           errno: EBADF))) {
            _ = try UffdHandoverListener.takeOver(pid: getpid(), remoteFD: 999_999)
        }
    }
}
