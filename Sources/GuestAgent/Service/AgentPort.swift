// Finding the agent's virtio-serial port. The host names it (`-device virtserialport,name=org.epcopy.agent.0`);
// the guest kernel shows the name in /sys/class/virtio-ports/vportNpM/name. /dev/virtio-ports/NAME exists only
// where udev runs, and /dev/vportNpM only with devtmpfs, so the node is created from the `dev` numbers if absent.

#if canImport(Glibc)
import Glibc
#endif

public enum AgentPort {
    public static let defaultName = "org.epcopy.agent.0"
    public static let sysfs = "/sys/class/virtio-ports"

    /// The device node of the port called `name`, or nil if no such port exists (yet).
    public static func find(name: String, sysfs: String = AgentPort.sysfs) -> String? {
        for entry in GuestFiles.list(sysfs) {
            guard let text = try? GuestFiles.readText("\(sysfs)/\(entry)/name", limit: 256),
                  text.split(whereSeparator: \.isNewline).first.map(String.init) == name
            else { continue }
            let node = "/dev/\(entry)"
            if !GuestFiles.exists(node),
               let dev = try? GuestFiles.readText("\(sysfs)/\(entry)/dev", limit: 64),
               case let parts = dev.split(whereSeparator: { $0 == ":" || $0.isNewline }), parts.count == 2,
               let major = UInt32(parts[0]), let minor = UInt32(parts[1]) {
                mknod(node, S_IFCHR | 0o600, makedev(major, minor))
            }
            return node
        }
        return nil
    }

    private static func makedev(_ major: UInt32, _ minor: UInt32) -> dev_t {
        // glibc's gnu_dev_makedev, spelled out (it is a macro-like inline Swift does not import).
        let ma = dev_t(major), mi = dev_t(minor)
        return ((ma & 0xfffff000) << 32) | ((ma & 0x00000fff) << 8) | ((mi & 0xffffff00) << 12) | (mi & 0x000000ff)
    }
}
