// `epcopy libvirt check|prepare`: what epcopy needs of a libvirt domain, item by item with the XML that provides
// each missing one, and the edit of the persistent definition that adds them (the old definition kept).

import ArgumentParser
import EpcopyHostEngine
import Foundation

struct Libvirt: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "libvirt",
        abstract: "Make libvirt domains migratable by epcopy.",
        discussion: """
            epcopy migrates a libvirt domain's RAM through a shared file that its engines map, with a shim that \
            libvirt loads into the incoming QEMU on the destination and a second QMP monitor of epcopy's own. \
            `check` says what a domain has and lacks; `prepare` adds what it lacks to the persistent \
            definition, which takes effect the next time the domain boots (shut it down and start it).
            """,
        subcommands: [LibvirtCheck.self, LibvirtPrepare.self]
    )
}

/// Options both subcommands share.
struct LibvirtDomainOptions: ParsableArguments {
    @Argument(help: "The libvirt domain's name.") var domain: String
    @Option(help: "libvirt URI, e.g. qemu:///system or qemu+unix:///system?socket=PATH.") var connect = "qemu:///system"
    @Option(help: ArgumentHelp("The shim as the destination host has it.",
                               discussion: "Default: libEpcopyPreload.so next to this epcopy binary."))
    var shim: String?
    @Option(help: ArgumentHelp("Where libvirt's file-backed guest RAM is: qemu.conf's memory_backing_dir and a slash.",
                               discussion: "A prefix of the RAM files' paths that holds on every host (the shim hands over only those files)."))
    var ramPrefix = "/var/lib/libvirt/qemu/ram/"

    var requirements: DomainRequirements {
        let library = shim ?? URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
            .appendingPathComponent("libEpcopyPreload.so").path
        return DomainRequirements(memoryBackingDirectory: ramPrefix, shimLibrary: library)
    }

    func open() throws -> (LibvirtConnection, LibvirtDomain) {
        do {
            let connection = try LibvirtConnection(uri: connect)
            return (connection, try connection.domain(domain))
        } catch { throw CLIError("\(error)") }
    }
}

struct LibvirtCheck: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Say, item by item, what an enlightened migration needs of a domain and what it finds.",
        discussion: """
            Reads the domain's XML through libvirt (the live one when it runs) and prints one line per item: \
            ok, MISSING (required: `epcopy migrate` refuses the domain) or missing (optional), with the XML \
            to add. When the domain runs without an item that its persistent definition already has, it \
            says so: the definition takes effect at the next boot. Exit status 0 when the domain is \
            migratable, 1 when not. libvirt's own post-copy and pre-copy (migrate --mode postcopy|precopy) \
            need none of this.
            """
    )
    @OptionGroup var target: LibvirtDomainOptions
    @OptionGroup var output: OutputOptions

    func run() throws {
        let (_, domain) = try target.open()
        let requirements = target.requirements
        let check: DomainCheck
        var pending: [String] = []
        do {
            check = try requirements.check(xml: try domain.liveXML())
            if domain.isActive, domain.isPersistent {
                let next = try requirements.check(xml: try domain.persistentXML())
                let missingNow = Set(check.items.filter { !$0.ok }.map(\.name))
                pending = next.items.filter { $0.ok && missingNow.contains($0.name) }.map(\.name)
            }
        } catch { throw CLIError("\(error)") }
        if output.json {
            struct Report: Encodable {
                let check: DomainCheck
                let pendingRestart: [String]
                enum CodingKeys: String, CodingKey { case check, pendingRestart = "pending_restart" }
            }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
            print(String(decoding: try encoder.encode(Report(check: check, pendingRestart: pending)), as: UTF8.self))
        } else {
            print("domain \(check.domain) (\(target.connect)):")
            for item in check.items {
                let mark = item.ok ? "ok     " : (item.required ? "MISSING" : "missing")
                print("  \(mark) \(item.name): \(item.found)")
                if !item.ok {
                    print("          why: \(item.why)")
                    if pending.contains(item.name) {
                        print("          the persistent definition has it: it takes effect when the domain boots again")
                    } else if let fix = item.fix {
                        print("          add: " + fix.replacingOccurrences(of: "\n", with: "\n               "))
                    }
                }
            }
            if check.migratable {
                print("\(check.domain) can be migrated by epcopy (enlightened mode).")
            } else {
                let prepare = "epcopy libvirt prepare \(check.domain)" + (target.connect == "qemu:///system" ? "" : " --connect '\(target.connect)'")
                let fixable = check.items.contains { !$0.ok && $0.required && $0.fix != nil }
                print("\(check.domain) cannot be migrated by epcopy in enlightened mode yet"
                      + (fixable ? "; `\(prepare)` adds what an edit can, then restart the domain." : "."))
            }
        }
        if !check.migratable { throw ExitCode(1) }
    }
}

struct LibvirtPrepare: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prepare",
        abstract: "Add what an enlightened migration needs to a domain's persistent definition.",
        discussion: """
            Applies the edits `epcopy libvirt check` lists (shared file memory, epcopy's monitor, the shim's \
            environment, the agent channel) to the persistent definition through libvirt, keeping the old \
            definition in --backup-dir first. A running domain keeps running as it is: the new definition \
            takes effect the next time it boots. Items no edit can provide (hugepages, guest NUMA cells) are \
            left as they are and named.
            """
    )
    @OptionGroup var target: LibvirtDomainOptions
    @Option(help: "Where the old definition is kept.") var backupDir = "/var/lib/epcopy/libvirt-backups"

    func run() throws {
        let (connection, domain) = try target.open()
        guard domain.isPersistent else {
            throw CLIError("\(target.domain) is a transient domain (no persistent definition to edit): define it first (virsh define)")
        }
        let old: String
        let prepared: (xml: String, added: [String])
        do {
            old = try domain.persistentXML()
            prepared = try target.requirements.prepare(xml: old)
        } catch { throw CLIError("\(error)") }
        guard !prepared.added.isEmpty else {
            print("\(target.domain): the persistent definition already has everything an edit can add")
            return
        }
        try FileManager.default.createDirectory(atPath: backupDir, withIntermediateDirectories: true)
        let stamp = Int(Date().timeIntervalSince1970)
        let backup = "\(backupDir)/\(target.domain).\(stamp).xml"
        guard FileManager.default.createFile(atPath: backup, contents: Data(old.utf8)) else {
            throw CLIError("cannot keep the old definition in \(backup): nothing was changed")
        }
        do { try connection.define(prepared.xml) } catch {
            throw CLIError("libvirt refused the prepared definition (\(error)); nothing was changed, the old one is also in \(backup)")
        }
        print("\(target.domain): added \(prepared.added.joined(separator: ", ")); the old definition is in \(backup)")
        print(domain.isActive ? "\(target.domain) runs with its old definition until it boots again (virsh shutdown, then virsh start)."
                              : "It takes effect when \(target.domain) starts.")
        let check = try target.requirements.check(xml: prepared.xml)
        for item in check.items where !item.ok && item.required {
            print("still missing, no edit can add it: \(item.name): \(item.found) (\(item.why))")
        }
    }
}
