// A workload VM — the benchmark image (Debian, memcached, MariaDB, the agent) on a qcow2 overlay, memcached
// forwarded from the host's address — migrated in each mode: the value stored before the switch is served from
// the destination host's address afterwards, and in enlightened mode every placed page equals the source's.

import EpcopyHostEngine
import EpcopyTestSupport
import Foundation
import Testing

/// One memcached text-protocol exchange; returns what the server said (up to "END"/"STORED"/an error).
func memcached(_ host: String, _ port: UInt16, _ request: String, timeout: TimeInterval = 5) -> String? {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var tv = timeval(tv_sec: Int(timeout), tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = port.bigEndian
    inet_pton(AF_INET, host, &addr.sin_addr)
    let connected = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard connected == 0 else { return nil }
    _ = request.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
    var reply = ""
    var buffer = [UInt8](repeating: 0, count: 4096)
    while !(reply.hasSuffix("END\r\n") || reply.hasSuffix("STORED\r\n") || reply.hasSuffix("ERROR\r\n")) {
        let n = recv(fd, &buffer, buffer.count, 0)
        if n <= 0 { break }
        reply += String(decoding: buffer[..<n], as: UTF8.self)
    }
    return reply
}

@Suite(.serialized, .tier(.qemu), .requires(.benchImage)) struct WorkloadVMTests {
    @Test(arguments: MigrationMode.allCases)
    func memcachedKeepsServingFromTheDestination(mode: MigrationMode) throws {
        let overlay = "/var/tmp/epcopy-test-\(getpid())-\(mode.rawValue).qcow2"
        let create = Process()
        create.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-img")
        create.arguments = ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "\(Prerequisite.benchImageDirectory)/bench.img", overlay]
        try create.run()
        create.waitUntilExit()
        try #require(create.terminationStatus == 0)
        defer { unlink(overlay) }

        var config = QEMUConfig(name: "wl-\(mode.rawValue)-\(getpid())", memoryMiB: 1024, deadlineSeconds: 300)
        config.kernel = "\(Prerequisite.testGuestDirectory)/vmlinux"
        config.initrd = "\(Prerequisite.benchImageDirectory)/initrd.img"
        config.append = "console=ttyS0 quiet root=/dev/vda rw epcopy.ip=10.0.2.15/24 epcopy.gw=10.0.2.2 "
            + "epcopy.memcached_mb=64 epcopy.mariadb=0"
        config.disk = overlay
        config.forwards = [11211]
        config.forwardHost = "127.0.0.1"
        let source = try QEMUProcess.launch(config, connectTimeout: .seconds(30))
        defer { source.kill(); source.teardown() }
        try #require(waitUntil(deadline: .seconds(120), poll: .milliseconds(300)) {
            source.serialLog.contains("memcached up")
        }, "\(source.serialLog.suffix(1500))")
        let value = "moved-by-\(mode.rawValue)"
        #expect(memcached("127.0.0.1", 11211, "set epcopy 0 0 \(value.utf8.count)\r\n\(value)\r\n") == "STORED\r\n")

        // The destination host is 127.0.0.2: the same port, another address, as on another machine.
        let session = UInt64.random(in: 1...UInt64.max)
        let options = MigrationOptions(mode: mode, verify: true, preloadLibrary: GuestFixture.preload, settleSeconds: 1)
        let destination = try DestinationSide(spec: VMSpec(source.config), name: "wl-\(mode.rawValue)-dst-\(getpid())",
                                              mode: mode, session: session, bindHost: "127.0.0.2", options: options)
        defer { destination.qemu.kill(); destination.qemu.teardown() }
        let sourceOutcome = try SourceSide.migrate(source: source, mode: mode, session: session,
                                                   destinationURI: destination.migrationURI,
                                                   engineEndpoint: destination.engineEndpoint, options: options)
        let result = Migration.combine(source: sourceOutcome, destination: try destination.finish(),
                                       destinationSide: destination, options: options)
        print("workload VM, \(mode): \(result)")
        #expect(result.mismatchedPages == 0)
        #expect(!result.guestVerdict.hasPrefix("CRASHED"), "\(result.guestVerdict)")
        if mode == .enlightened { #expect(result.enlightened == true, "\(result.agentNotes ?? [])") }
        let reply = memcached("127.0.0.2", 11211, "get epcopy\r\n")
        #expect(reply == "VALUE epcopy 0 \(value.utf8.count)\r\n\(value)\r\nEND\r\n", "\(reply ?? "no answer")")
    }
}
