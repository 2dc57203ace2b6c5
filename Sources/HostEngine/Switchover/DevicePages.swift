// The guest pages QEMU's device-state load reads on the destination, asked of the source QEMU before
// the switch. Those loads fault serially inside downtime (67 faults before RESUME in every measured
// run: 64 virtio vring pages and the ROM shadow at 0xC0000–0xC2FFF), so the source pushes them first,
// right at STOP.

import EpcopyProtocol

enum DevicePages {
    /// Guest-physical pages the device-state load reads: the ROM shadow and every virtqueue's rings, as RAM-file
    /// pages. On q35 RAM below 4 GiB sits at the same RAM-file offset, where all of these live.
    static func query(_ qmp: QMPClient, regionPages: UInt64) -> PageSet<PageIndex> {
        var pages = PageSet<PageIndex>()
        pages.insert(try! PageRange(start: PageIndex(rawValue: 0xC0), count: 3))  // 0xC0000-0xC2FFF
        guard let devices = try? qmp.execute("x-query-virtio", timeout: .seconds(5)).arrayValue else { return pages }
        for device in devices {
            guard let path = device["path"]?.stringValue,
                  let status = try? qmp.execute("x-query-virtio-status", arguments: ["path": .string(path)],
                                                timeout: .seconds(5)),
                  let queues = status["num-vqs"]?.intValue, queues > 0, queues < 1024
            else { continue }
            for queue in 0..<queues {
                guard let q = try? qmp.execute("x-query-virtio-queue-status",
                                                arguments: ["path": .string(path), "queue": .int(queue)],
                                                timeout: .seconds(5)),
                      let num = q["vring-num"]?.intValue, num > 0
                else { continue }
                for (key, size) in [("vring-desc", 16 * num), ("vring-avail", 6 + 2 * num), ("vring-used", 6 + 8 * num)] {
                    guard let address = q[key]?.intValue, address > 0,
                          let offset = ramOffset(guestPhysical: UInt64(address), regionPages: regionPages)
                    else { continue }
                    let first = offset >> PageGeometry.shift
                    let last = (offset + UInt64(size) - 1) >> PageGeometry.shift
                    guard last < regionPages else { continue }
                    pages.insert(try! PageRange(start: PageIndex(rawValue: first), count: last - first + 1))
                }
            }
        }
        return pages
    }

    /// Where a guest-physical address lives in the RAM file (q35 layout, see GuestRAMLayout); nil outside RAM.
    static func ramOffset(guestPhysical gpa: UInt64, regionPages: UInt64) -> UInt64? {
        GuestRAMLayout(regionPages: regionPages)
            .pageIndex(GuestFrameNumber(rawValue: gpa >> PageGeometry.shift))
            .map { ($0.rawValue << PageGeometry.shift) | (gpa & (PageGeometry.size - 1)) }
    }
}
