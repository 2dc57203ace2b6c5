// NUMA placement on the destination: the choice against sysfs trees written here (1, 2 and 4 nodes, unequal free
// memory, CPU lists), numa_maps parsing, and a real binding on this host: a shmem RAM file bound before pages are
// placed into a registered mapping with UFFDIO_COPY (as the destination engine places them), then counted where
// numa_maps says they are.

@testable import EpcopyHostEngine
import EpcopyTestSupport
import Foundation
import Testing

/// A sysfs node tree: (cpulist, MiB total, MiB free) per node.
private func fixture(_ nodes: [(String, UInt64, UInt64)]) throws -> String {
    let root = NSTemporaryDirectory() + "epcopy-numa-\(UInt32.random(in: 0...UInt32.max))"
    for (id, node) in nodes.enumerated() {
        let dir = "\(root)/node\(id)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "\(node.0)\n".write(toFile: "\(dir)/cpulist", atomically: true, encoding: .utf8)
        try """
            Node \(id) MemTotal:       \(node.1 << 10) kB
            Node \(id) MemFree:        \(node.2 << 10) kB
            Node \(id) MemUsed:        \((node.1 - node.2) << 10) kB

            """.write(toFile: "\(dir)/meminfo", atomically: true, encoding: .utf8)
    }
    // Entries sysfs also has, which are not nodes.
    try "0-\(nodes.count - 1)\n".write(toFile: "\(root)/online", atomically: true, encoding: .utf8)
    return root
}

@Suite(.tier(.unit)) struct NumaPlacementTests {
    @Test func oneNodeIsTheOnlyChoice() throws {
        let topology = try NumaTopology.read(root: try fixture([("0-1", 24_000, 20_000)]))
        #expect(topology.nodes == [NumaNode(id: 0, cpus: [0, 1], totalBytes: 24_000 << 20, freeBytes: 20_000 << 20)])
        #expect(try NumaPlacement.choose(.auto, topology: topology, guestBytes: 512 << 20).node == 0)
        #expect(try NumaPlacement.choose(.node(0), topology: topology, guestBytes: 512 << 20).node == 0)
        #expect(throws: NumaError.self) { try NumaPlacement.choose(.node(1), topology: topology, guestBytes: 1) }
    }

    @Test func autoTakesTheNodeWithTheMostFreeMemoryAmongThoseThatRunTheVCPUs() throws {
        let topology = try NumaTopology.read(root: try fixture([("0-3", 16_384, 2_000), ("4-7", 16_384, 9_000),
                                                                ("8-11", 16_384, 12_000), ("12-15", 16_384, 6_000)]))
        #expect(topology.nodes.map(\.id) == [0, 1, 2, 3])
        #expect(topology.node(ofCPU: 13)?.id == 3)
        // Anywhere: the most free memory.
        #expect(try NumaPlacement.choose(.auto, topology: topology, guestBytes: 4 << 30).node == 2)
        // vCPUs on node 1 or 3: the one of those with the most free memory, though node 2 has more.
        let near = try NumaPlacement.choose(.auto, topology: topology, guestBytes: 4 << 30, vcpuCPUs: [5, 13])
        #expect(near.node == 1, "\(near)")
        #expect(near.cpus == [4, 5, 6, 7])
        // vCPUs only on node 0, which cannot hold the guest: the largest node that can.
        let far = try NumaPlacement.choose(.auto, topology: topology, guestBytes: 4 << 30, vcpuCPUs: [1])
        #expect(far.node == 2, "\(far)")
        #expect(far.reason.contains("none runs its vCPUs"))
        // Nothing holds it: the most free memory, and the reason says so.
        let none = try NumaPlacement.choose(.auto, topology: topology, guestBytes: 20 << 30)
        #expect(none.node == 2 && none.reason.contains("no node holds"), "\(none)")
        // A named node is honoured even when short of memory, and the reason says so.
        let named = try NumaPlacement.choose(.node(0), topology: topology, guestBytes: 4 << 30)
        #expect(named.node == 0 && named.reason.contains("only 2000 MiB free"), "\(named)")
    }

    @Test func twoEqualNodesTieToTheLowerOneAndAMemoryOnlyNodeRunsNoVCPUs() throws {
        let topology = try NumaTopology.read(root: try fixture([("0", 8_192, 4_000), ("1", 8_192, 4_000), ("", 8_192, 7_000)]))
        #expect(topology.nodes[2].cpus.isEmpty)
        // The memory-only node holds more, but runs no CPU: a node with CPUs comes first.
        #expect(try NumaPlacement.choose(.auto, topology: topology, guestBytes: 1 << 30).node == 0)
    }

    @Test func malformedTreesAndRequestsAreRefused() throws {
        #expect(NumaTopology.parseCPUList("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11])
        for bad in ["3-1", "a", "0-", "-1", "1-2-3", "99999999"] { #expect(NumaTopology.parseCPUList(bad) == nil, "\(bad)") }
        #expect(throws: NumaError.self) { try NumaTopology.read(root: "/nonexistent-epcopy") }
        #expect(NumaRequest("auto") == .auto)
        #expect(NumaRequest("3") == .node(3))
        for bad in ["-1", "x", "1024", ""] { #expect(NumaRequest(bad) == nil, "\(bad)") }
    }

    @Test func numaMapsCountsThePagesOfOneMappingByNode() {
        let text = """
            55d0c0000000 default file=/usr/bin/qemu-system-x86_64 mapped=100 N0=100 kernelpagesize_kB=4
            7f3a40000000 prefer:1 file=/dev/shm/epcopy-x.ram dirty=5000 N0=250 N1=4750 kernelpagesize_kB=4
            7ffd00000000 default stack anon=3 dirty=3 N0=3 kernelpagesize_kB=4
            """
        let pages = NumaBinding.pagesByNode(numaMaps: text, address: 0x7f3a4000_0000)
        #expect(pages == [0: 250, 1: 4750])
        #expect(NumaBinding.fraction(onNode: 1, of: pages ?? [:]) == 0.95)
        #expect(NumaBinding.pagesByNode(numaMaps: text, address: 0x1000) == nil)
        #expect(NumaBinding.fraction(onNode: 0, of: [:]) == nil)
    }
}

@Suite(.serialized, .tier(.linux)) struct NumaBindingTests {
    /// The engine's order: bind the file, then place pages into a MISSING-registered shared mapping of it.
    @Test func pagesPlacedWithUffdCopyLandOnTheBoundNode() throws {
        let topology = try NumaTopology.read()
        let choice = try NumaPlacement.choose(.auto, topology: topology, guestBytes: 8 << 20)
        let path = "/dev/shm/epcopy-numa-test-\(getpid()).ram"
        let pages = 2048
        let length = pages << 12
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        #expect(fd >= 0)
        defer { close(fd); unlink(path) }
        #expect(ftruncate(fd, off_t(length)) == 0)
        try NumaBinding.prefer(node: choice.node, file: path, length: UInt64(length))
        let base = try #require(mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0))
        #expect(base != MAP_FAILED)
        defer { munmap(base, length) }
        let uffd = try Userfaultfd(path: .syscall, features: [.missingShmem])
        let address = UInt(bitPattern: base)
        _ = try uffd.register(start: address, length: length, mode: .missing)
        let source = [UInt8](repeating: 0xA5, count: 64 << 12)
        for chunk in stride(from: 0, to: pages, by: 64) {
            _ = try source.withUnsafeBytes { try uffd.copy(to: address + UInt(chunk << 12), from: $0.baseAddress!, length: 64 << 12) }
        }
        let counted = try #require(NumaBinding.pagesByNode(pid: getpid(), address: UInt64(address)))
        #expect(counted.values.reduce(0, +) == UInt64(pages), "numa_maps: \(counted)")
        #expect(NumaBinding.fraction(onNode: choice.node, of: counted) == 1.0, "numa_maps: \(counted), node \(choice.node)")
        #expect(base.load(fromByteOffset: length - 1, as: UInt8.self) == 0xA5)
    }
}

@Suite(.tier(.unit)) struct DomainDevicesTests {
    @Test func theLiveXMLGivesSerialLogAgentSocketMemoryAndTheNumatuneNode() throws {
        let xml = """
            <domain type='qemu'><name>d</name><memory unit='KiB'>524288</memory>
              <numatune><memory mode='strict' nodeset='1-2'/></numatune>
              <devices>
                <serial type='pty'><log file='/var/log/libvirt/qemu/d.serial.log'/></serial>
                <channel type='unix'><source mode='bind' path='/run/libvirt/qemu/channel/1-d/org.epcopy.agent.0'/>
                  <target type='virtio' name='org.epcopy.agent.0'/></channel>
              </devices></domain>
            """
        let devices = try DomainDevices(liveXML: xml)
        #expect(devices.serialLog == "/var/log/libvirt/qemu/d.serial.log")
        #expect(devices.agentSocket == "/run/libvirt/qemu/channel/1-d/org.epcopy.agent.0")
        #expect(devices.memoryBytes == 512 << 20)
        #expect(devices.numaNode == 1)
        let plain = try DomainDevices(liveXML: "<domain><memory unit='MiB'>256</memory></domain>")
        #expect(plain.numaNode == nil && plain.serialLog == nil && plain.agentSocket == nil)
        #expect(plain.memoryBytes == 256 << 20)
        #expect(try DomainDevices(liveXML: "<domain><memory unit='parsecs'>1</memory></domain>").memoryBytes == nil)
    }
}
