// DomainQEMU: the QEMU that libvirt runs for a domain on this host, described as epcopy needs it to attach
// (QEMUProcess.attach(managed:)) through epcopy's own monitor: its PID (libvirt's pidfile), that monitor's
// socket, the guest RAM file and size, the serial log and the agent's socket. libvirt starts and stops it.

import Foundation

enum DomainQEMU {
    /// Where libvirt's QEMU driver keeps its per-domain files on every host.
    static let runDirectory = "/run/libvirt/qemu"

    /// A config describing libvirt's QEMU of domain `name` (`uuid`), whose RAM epcopy reaches at `ramFile`.
    static func config(name: String, uuid: String, devices: DomainDevices, requirements: DomainRequirements,
                       ramFile: String, ramBytes: UInt64) -> QEMUConfig {
        var config = QEMUConfig(name: "libvirt-\(name)", memoryMiB: Int(ramBytes >> 20), runDirectory: runDirectory)
        config.ramPadKiB = Int((ramBytes & 0xF_FFFF) >> 10)
        config.ramFile = ramFile
        config.qmpSocket = requirements.monitorSocket(uuid: uuid)
        config.serialLog = devices.serialLog ?? "\(runDirectory)/\(name).no-serial-log"
        config.agentSocket = devices.agentSocket ?? "\(runDirectory)/\(name).no-agent-channel"
        config.pidFile = "\(runDirectory)/\(name).pid"
        return config
    }

    /// The PID of libvirt's QEMU of domain `name`, from libvirt's pidfile.
    static func pid(name: String) throws -> Int32 {
        let path = "\(runDirectory)/\(name).pid"
        guard let text = try? String(contentsOfFile: path, encoding: .utf8),
              let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 1 else {
            throw ControlError.remote("no QEMU PID in \(path): is \(name) running under this host's libvirt?")
        }
        return pid
    }

    /// The guest RAM file of the QEMU on the other end of `qmp`: the mem-path of its one file-backed memory backend.
    static func ramFile(_ qmp: QMPClient) throws -> String {
        let objects = try qmp.execute("qom-list", arguments: ["path": .string("/objects")], timeout: .seconds(5))
        let backends = (objects.arrayValue ?? []).filter { $0["type"]?.stringValue == "child<memory-backend-file>" }
        guard backends.count == 1, let id = backends[0]["name"]?.stringValue else {
            throw ControlError.remote("the domain's QEMU has \(backends.count) file-backed memory backends; epcopy moves exactly one")
        }
        let path = try qmp.execute("qom-get", arguments: ["path": .string("/objects/\(id)"), "property": .string("mem-path")],
                                   timeout: .seconds(5))
        guard let file = path.stringValue, file.hasPrefix("/") else {
            throw ControlError.remote("memory backend \(id) has no mem-path")
        }
        return file
    }
}
