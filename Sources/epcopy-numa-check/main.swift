// epcopy-numa-check: the destination engine's NUMA placement, checked on a kernel with two or more nodes. It runs
// inside a test guest started with several NUMA nodes (`epcopy.numa_check=1` on its command line; the host has
// one node), and does for each node what the engine does for a guest's RAM: the shmem file is bound to the node
// (NumaBinding.prefer, the engine's own code) before any page exists, a shared mapping of it is registered with
// userfaultfd (MISSING), every page is placed with UFFDIO_COPY, and numa_maps says where the pages landed
// (NumaBinding.pagesByNode). It also prints the node `auto` would choose. One line per node, then
// `epcopy-numa-check: OK` or `epcopy-numa-check: FAIL <why>`; exit status 0 only with OK. `--one-node` runs the
// same steps where the kernel has one node (the mechanics only); `--unbound` leaves the binding out (a control
// run that must fail on every node but the placing CPU's).
// Static (glibc only), like epcopy-agent: the guest has no Swift runtime.

import CEpcopyLinux
import EpcopyNuma
import Glibc

/// --unbound: the control run, without the binding: pages land where the placing CPU is, and the check must fail.
let unbound = CommandLine.arguments.contains("--unbound")
let pageSize = 4096
let pages = 2048  // 8 MiB per node
let chunkPages = 64

func fail(_ why: String) -> Never {
    print("epcopy-numa-check: FAIL \(why)")
    exit(1)
}

func errnoText(_ code: Int32) -> String { String(cString: strerror(code)) }

/// Places `pages` pages into a fresh shmem file bound to `node`, the engine's way; returns numa_maps' count by node.
func placeOnNode(_ node: Int) -> [Int: UInt64] {
    let length = pages * pageSize
    let fd = epc_memfd_create("epcopy-numa-check", 0)
    guard fd >= 0 else { fail("memfd_create: \(errnoText(-fd))") }
    defer { close(fd) }
    guard ftruncate(fd, off_t(length)) == 0 else { fail("ftruncate: \(errnoText(errno))") }
    if !unbound {
        do { try NumaBinding.prefer(node: node, file: "/proc/self/fd/\(fd)", length: UInt64(length)) } catch {
            fail("bind to node \(node): \(error)")
        }
    }
    guard let base = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), base != MAP_FAILED else {
        fail("mmap: \(errnoText(errno))")
    }
    defer { munmap(base, length) }
    let uffd = epc_userfaultfd(O_CLOEXEC | O_NONBLOCK)
    guard uffd >= 0 else { fail("userfaultfd: \(errnoText(-uffd))") }
    defer { close(uffd) }
    var features: UInt64 = 0
    var ioctls: UInt64 = 0
    let api = epc_uffd_api(uffd, UInt64(UFFD_FEATURE_MISSING_SHMEM), &features, &ioctls)
    guard api == 0 else { fail("UFFDIO_API: \(errnoText(Int32(-api)))") }
    let address = UInt64(UInt(bitPattern: base))
    let registered = epc_uffd_register(uffd, address, UInt64(length), UInt64(UFFDIO_REGISTER_MODE_MISSING), &ioctls)
    guard registered == 0 else { fail("UFFDIO_REGISTER: \(errnoText(Int32(-registered)))") }
    var source = [UInt8](repeating: 0, count: chunkPages * pageSize)
    for chunk in stride(from: 0, to: pages, by: chunkPages) {
        for page in 0..<chunkPages { source[page * pageSize] = UInt8(truncatingIfNeeded: chunk + page + node) }
        var done: Int64 = 0
        let rc = source.withUnsafeBytes {
            epc_uffd_copy(uffd, address + UInt64(chunk * pageSize), UInt64(UInt(bitPattern: $0.baseAddress!)),
                          UInt64(chunkPages * pageSize), 0, &done)
        }
        guard rc == 0, done == Int64(chunkPages * pageSize) else { fail("UFFDIO_COPY at page \(chunk): \(errnoText(Int32(-rc)))") }
    }
    // SAFETY: `base` maps `length` bytes; page * pageSize < length.
    for page in 0..<pages where base.load(fromByteOffset: page * pageSize, as: UInt8.self) != UInt8(truncatingIfNeeded: page + node) {
        fail("page \(page) on node \(node) does not hold what was placed")
    }
    guard let counted = NumaBinding.pagesByNode(pid: getpid(), address: address) else {
        fail("no numa_maps line for the mapping at \(String(address, radix: 16))")
    }
    return counted
}

let topology: NumaTopology
do { topology = try NumaTopology.read() } catch { fail("\(error)") }
let described = topology.nodes.map { "node\($0.id) cpus=\($0.cpus.map(String.init).joined(separator: ",")) free=\($0.freeBytes >> 20)MiB" }
print("epcopy-numa-check: \(topology.nodes.count) nodes: \(described.joined(separator: "; "))")
// --one-node: the same steps on a kernel with one node (a host check of the mechanics, not of placement).
guard topology.nodes.count >= 2 || CommandLine.arguments.contains("--one-node") else { fail("the kernel sees \(topology.nodes.count) NUMA node(s); the check needs two or more") }
do {
    let choice = try NumaPlacement.choose(.auto, topology: topology, guestBytes: UInt64(pages * pageSize))
    print("epcopy-numa-check: auto chooses node \(choice.node) (\(choice.reason))")
} catch { fail("auto placement: \(error)") }
// Placement runs on the first node's CPUs, so each other node is a binding against the local one (as on a
// destination whose engine runs elsewhere than the guest's node).
if let local = topology.nodes.first, !local.cpus.isEmpty {
    let rc = local.cpus.map { Int32($0) }.withUnsafeBufferPointer { epc_set_affinity(0, $0.baseAddress, Int32($0.count)) }
    guard rc == 0 else { fail("sched_setaffinity to node \(local.id)'s CPUs: \(errnoText(-rc))") }
    print("epcopy-numa-check: placing from node \(local.id)'s CPUs")
}
var wrong: [String] = []
for node in topology.nodes {
    let counted = placeOnNode(node.id)
    let fraction = NumaBinding.fraction(onNode: node.id, of: counted) ?? 0
    let byNode = counted.sorted { $0.key < $1.key }.map { "N\($0.key)=\($0.value)" }.joined(separator: " ")
    print("epcopy-numa-check: \(unbound ? "unbound, meant for" : "bound to") node \(node.id): \(pages) pages placed with UFFDIO_COPY, numa_maps \(byNode), fraction on node \(Double(Int(fraction * 1000)) / 1000)")
    if fraction < 1.0 { wrong.append("node \(node.id): \(byNode)") }
}
if wrong.isEmpty {
    print("epcopy-numa-check: OK")
} else {
    fail("pages not on the bound node: \(wrong.joined(separator: "; "))")
}
