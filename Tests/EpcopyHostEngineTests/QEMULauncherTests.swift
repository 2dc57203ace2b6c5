// QEMULauncher against a real qemu-system-x86_64 (TCG, no guest kernel: SeaBIOS is enough for QMP
// and device-state migration). Proves the command line QEMU accepts, that launch errors carry QEMU's
// own message, that the watchdog enforces the deadline, that teardown leaves no process and no files,
// and that two QEMUs migrate device state with shared RAM the way epcopy does it.

import CEpcopyLinux
@testable import EpcopyHostEngine
import EpcopyTestSupport
import Foundation
import Glibc
import Testing

// MARK: - Fixtures (also used by QMPTests)

enum QEMUTestSupport {
    /// A 64 MiB, 1-vCPU TCG VM with files unique to this test run; `deadline` bounds it.
    static func config(_ role: String, extraArgs: [String] = [], deadline: Double = 25) -> QEMUConfig {
        var config = QEMUConfig(name: "test-\(role)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))",
                                memoryMiB: 64, vcpus: 1, accel: "tcg", deadlineSeconds: deadline)
        config.extraArgs = extraArgs
        return config
    }

    static func launch(_ config: QEMUConfig) throws -> QEMUProcess {
        try QEMUProcess.launch(config, connectTimeout: .seconds(10))
    }

    /// Whether `pid` is still a process started with this config (a reused PID would not match).
    static func isAlive(_ pid: Int32, _ config: QEMUConfig) -> Bool {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
        return String(decoding: data, as: UTF8.self).contains(config.qmpSocket)
    }

    static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    /// Nothing of this QEMU is left: no process, no RAM file, no socket, no pidfile, no log.
    static func expectNothingLeft(pid: Int32, _ config: QEMUConfig, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(!isAlive(pid, config), "QEMU \(pid) still runs", sourceLocation: sourceLocation)
        for path in [config.ramFile, config.qmpSocket, config.agentSocket, config.pidFile, config.serialLog, config.portLog] {
            #expect(!exists(path), "\(path) was left behind", sourceLocation: sourceLocation)
        }
    }
}

@Suite(.serialized, .tier(.qemu)) struct QEMULauncherTests {
    @Test func commandLineHasTheDesignShape() {
        var config = QEMUConfig(name: "shape", memoryMiB: 256, vcpus: 2, accel: "tcg")
        config.kernel = "/k/bzImage"
        config.initrd = "/k/initrd"
        config.append = "console=ttyS0 quiet"
        config.incoming = true
        config.extraArgs = ["-S"]
        #expect(config.arguments == [
            "-accel", "tcg", "-nodefaults", "-display", "none", "-machine", "q35,memory-backend=mem0",
            // 8 KiB more under TCG: QEMU < 9.0 loses dirty pages of 256 KiB-multiple RAM blocks (see ramPadKiB).
            "-m", "262152K", "-smp", "2",
            "-object", "memory-backend-file,id=mem0,size=262152K,mem-path=/dev/shm/epcopy-shape.ram,share=on",
            "-kernel", "/k/bzImage", "-initrd", "/k/initrd", "-append", "console=ttyS0 quiet",
            "-serial", "file:/tmp/epcopy-shape.serial.log",
            "-device", "virtio-serial-pci,max_ports=3",
            "-chardev", "socket,id=ch0,path=/tmp/epcopy-shape.agent,server=on,wait=off",
            "-device", "virtserialport,chardev=ch0,name=org.epcopy.agent.0",
            "-chardev", "file,id=ch1,path=/tmp/epcopy-shape.port.log",
            "-device", "virtserialport,chardev=ch1,name=org.epcopy.log.0",
            "-qmp", "unix:/tmp/epcopy-shape.qmp,server=on,wait=off",
            "-pidfile", "/tmp/epcopy-shape.pid",
            "-incoming", "defer", "-S",
        ])
        #expect(config.regionPages == 256 * 256 + 2)
        var kvm = config
        kvm.ramPadKiB = 0
        #expect(kvm.arguments.contains("256M"))
        kvm.ramPadKiB = 4
        #expect(throws: QEMUError.self) { try kvm.validate() }
        config.ramFile = "/dev/shm/a,b"
        #expect(throws: QEMUError.self) { try config.validate() }
    }

    @Test(.requires(.qemu))
    func badArgumentSurfacesQEMUsMessage() throws {
        let config = QEMUTestSupport.config("badarg", extraArgs: ["-device", "epcopy-no-such-device"])
        do throws(QEMUError) {
            let qemu = try QEMUProcess.launch(config, connectTimeout: .seconds(10))
            qemu.teardown()
            Issue.record("QEMU accepted -device epcopy-no-such-device")
        } catch {
            guard case .exitedEarly(let status, let stderr) = error else {
                Issue.record("expected exitedEarly, got \(error)")
                return
            }
            #expect(status == 1)
            #expect(stderr.contains("'epcopy-no-such-device' is not a valid device model name"), "\(stderr)")
            #expect(error.description.hasPrefix("QEMU launch: QEMU exited with status 1: qemu-system-x86_64: -device"))
        }
        for path in [config.ramFile, config.qmpSocket, config.agentSocket, config.pidFile, config.serialLog, config.portLog] {
            #expect(!QEMUTestSupport.exists(path), "\(path) was left behind")
        }
    }

    @Test(.requires(.qemu))
    func watchdogKillsQEMUAtItsDeadline() throws {
        let config = QEMUTestSupport.config("deadline", extraArgs: ["-S"], deadline: 2)
        let started = monotonicNanos()
        let qemu = try QEMUTestSupport.launch(config)
        let pid = qemu.pid
        #expect(qemu.isRunning)
        let ended = qemu.waitForExit(timeout: .seconds(8))
        let elapsed = Double(monotonicNanos() - started) / 1e9
        #expect(ended == .signaled(SIGKILL))
        #expect(qemu.deadlineExpired)
        #expect(elapsed >= 1.9 && elapsed < 4, "killed after \(elapsed) s")
        #expect(throws: QMPError.self) { try qemu.qmp.execute("query-status", timeout: .seconds(2)) }
        qemu.teardown()
        QEMUTestSupport.expectNothingLeft(pid: pid, config)
    }

    @Test(.requires(.qemu))
    func teardownLeavesNoProcessAndNoFiles() throws {
        let config = QEMUTestSupport.config("teardown", extraArgs: ["-S"])
        let qemu = try QEMUTestSupport.launch(config)
        let pid = qemu.pid
        #expect(QEMUTestSupport.isAlive(pid, config))
        #expect(!qemu.deadlineExpired)
        var st = stat()
        #expect(stat(config.ramFile, &st) == 0 && UInt64(st.st_size) == config.ramBytes)
        #expect(stat(config.qmpSocket, &st) == 0 && st.st_mode & S_IFMT == S_IFSOCK)
        #expect(stat(config.agentSocket, &st) == 0 && st.st_mode & S_IFMT == S_IFSOCK)
        let pidText = try String(contentsOfFile: config.pidFile, encoding: .utf8)
        #expect(pidText.trimmingCharacters(in: .whitespacesAndNewlines) == "\(pid)")
        qemu.teardown()
        #expect(qemu.termination == .signaled(SIGKILL))
        #expect(!qemu.deadlineExpired)
        QEMUTestSupport.expectNothingLeft(pid: pid, config)
        #expect(throws: QMPError.self) { try qemu.qmp.execute("query-status", timeout: .seconds(1)) }
    }

    @Test(.requires(.qemu))
    func keptRAMFileOutlivesItsQEMU() throws {
        let config = QEMUTestSupport.config("keepram", extraArgs: ["-S"])
        let qemu = try QEMUTestSupport.launch(config)
        defer { unlink(config.ramFile) }
        qemu.keepRAMFile = true
        qemu.kill()
        #expect(!qemu.isRunning)
        qemu.teardown()
        #expect(QEMUTestSupport.exists(config.ramFile))
        #expect(!QEMUTestSupport.exists(config.qmpSocket))
    }

    /// epcopy's switchover with both QEMUs real: RAM is shared (x-ignore-shared, so it is not sent), the
    /// source pauses before switchover once it has stopped, its RAM file is copied to the destination's
    /// (post-copy's stand-in), then device state moves and the destination resumes.
    @Test(.requires(.qemu))
    func migratesDeviceStateWithSharedRAM() throws {
        let sourceConfig = QEMUTestSupport.config("src")
        var destinationConfig = QEMUTestSupport.config("dst")
        destinationConfig.incoming = true
        let uri = "unix:/tmp/epcopy-test-migration-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        defer { unlink(String(uri.dropFirst(5))) }

        let source = try QEMUTestSupport.launch(sourceConfig)
        defer { source.teardown() }
        let destination = try QEMUTestSupport.launch(destinationConfig)
        defer { destination.teardown() }
        #expect(try destination.qmp.execute("query-status", timeout: .seconds(5))["status"] == "inmigrate")

        let capabilities: QMPValue = [
            ["capability": "x-ignore-shared", "state": true],
            ["capability": "events", "state": true],
        ]
        _ = try destination.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": capabilities],
                                        timeout: .seconds(5))
        var sourceCapabilities = capabilities.arrayValue!
        sourceCapabilities.append(["capability": "pause-before-switchover", "state": true])
        _ = try source.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": .array(sourceCapabilities)],
                                   timeout: .seconds(5))
        _ = try destination.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)], timeout: .seconds(5))

        let start = monotonicNanos()
        _ = try source.qmp.execute("migrate", arguments: ["uri": .string(uri)], timeout: .seconds(5))
        let paused = try source.qmp.waitForEvent("MIGRATION", timeout: .seconds(10), after: start) {
            $0.data["status"] == "pre-switchover"
        }
        let stop = try source.qmp.waitForEvent("STOP", timeout: .seconds(1), after: start)
        #expect(stop.receivedNanos <= paused.receivedNanos)

        // The source is stopped: its RAM is final. Copy it into the destination's (mapped, not yet running).
        let copyStart = monotonicNanos()
        let copiedBytes = try copyNonZeroPages(from: sourceConfig.ramFile, to: destinationConfig.ramFile)
        let copyEnd = monotonicNanos()

        _ = try source.qmp.execute("migrate-continue", arguments: ["state": "pre-switchover"], timeout: .seconds(5))
        let resume = try destination.qmp.waitForEvent("RESUME", timeout: .seconds(10), after: start)
        let completed = try source.qmp.waitForEvent("MIGRATION", timeout: .seconds(10), after: start) {
            $0.data["status"] == "completed"
        }
        #expect(stop.receivedNanos < completed.receivedNanos)
        #expect(stop.timestamp <= completed.timestamp)
        #expect(resume.seconds > 0)
        #expect(try destination.qmp.execute("query-status", timeout: .seconds(5))["status"] == "running")
        #expect(try source.qmp.execute("query-status", timeout: .seconds(5))["status"] == "postmigrate")

        let info = try source.qmp.execute("query-migrate", timeout: .seconds(5))
        let ramSent = info["ram"]?["transferred"]?.intValue ?? -1
        #expect(ramSent >= 0 && ramSent < 8 << 20, "x-ignore-shared should keep guest RAM off the wire: \(ramSent) B")

        let ms = { (a: UInt64, b: UInt64) in Double(b - a) / 1e6 }
        print("""
            QEMU migration: downtime (source STOP → destination RESUME, local receive) \
            \(String(format: "%.1f", ms(stop.receivedNanos, resume.receivedNanos))) ms, of which RAM copy \
            \(String(format: "%.1f", ms(copyStart, copyEnd))) ms (\(copiedBytes >> 10) KiB non-zero); \
            migrate-continue → RESUME \(String(format: "%.1f", ms(copyEnd, resume.receivedNanos))) ms; \
            QMP stamps STOP→RESUME \(String(format: "%.1f", (resume.timestamp - stop.timestamp) * 1e3)) ms; \
            RAM on the wire \(ramSent) B; query-migrate downtime \(info["downtime"]?.intValue ?? -1) ms
            """)
    }
}

/// Copies every non-zero 4 KiB page of `source` into `destination` at the same offset, without
/// truncating `destination` (a QEMU has it mapped). Returns the bytes written.
private func copyNonZeroPages(from source: String, to destination: String) throws -> Int {
    let input = try FileDescriptor.open(source, O_RDONLY)
    let output = try FileDescriptor.open(destination, O_WRONLY)
    let chunk = 1 << 20
    let page = 4096
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: page)
    defer { buffer.deallocate() }
    let zeros = [UInt8](repeating: 0, count: page)
    var offset = 0
    var written = 0
    while true {
        let n = pread(input.rawValue, buffer.baseAddress, chunk, off_t(offset))
        guard n > 0 else {
            if n < 0 { throw SyscallError(call: "pread(\(source))", errno: errno) }
            return written
        }
        var p = 0
        while p < n {
            let length = min(page, n - p)
            let start = buffer.baseAddress! + p
            if memcmp(start, zeros, length) != 0 {
                guard pwrite(output.rawValue, start, length, off_t(offset + p)) == length else {
                    throw SyscallError(call: "pwrite(\(destination))", errno: errno)
                }
                written += length
            }
            p += length
        }
        offset += n
    }
}
