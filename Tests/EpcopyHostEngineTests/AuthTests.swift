// Engines authenticate each other with a shared key before any page moves: a source without the key,
// or with another key, is refused by the destination, and a source refuses a destination that cannot
// prove it holds the key.

import EpcopyHostEngine
import EpcopyProtocol
import EpcopyTestSupport
import Foundation
import Testing

/// Runs one small transfer with the given keys; returns the errors of each side (nil = success).
func transferWithKeys(source sourceKey: [UInt8]?, destination destinationKey: [UInt8]?) throws
    -> (source: String?, destination: String?)
{
    let pages: UInt64 = 256
    let src = try TestRAMFile("auth-src-\(UInt32.random(in: 0...UInt32.max))", size: Int(pages * 4096))
    try src.fillPattern(seed: 3, holes: PageSet())
    let dst = try TestRAMFile("auth-dst-\(UInt32.random(in: 0...UInt32.max))", size: Int(pages * 4096))
    let fd = try FileDescriptor.open(dst.path, O_RDWR)
    let memory = try DestinationMemory.registerOwn(file: fd, length: Int(pages * 4096))
    let engine = DestinationEngine(memory: memory, options: DestinationOptions(
        sessionID: 21, acceptTimeoutMillis: 3000, authKey: destinationKey))
    let listener = ListenerBox(try TCP.listen(on: Endpoint(host: "127.0.0.1", port: 0)))
    let endpoint = listener.listener.endpoint
    let d = Background("dst") { try engine.run(listener: listener.listener) }
    let source = try SourceEngine(ramFile: src.path, options: SourceOptions(
        sessionID: 21, vmName: "auth", connectTimeoutMillis: 3000, authKey: sourceKey))
    var sourceError: String? = nil
    do { _ = try source.run(destination: endpoint) } catch { sourceError = "\(error)" }
    var destinationError: String? = nil
    do { _ = try d.value() } catch { destinationError = "\(error)" }
    withExtendedLifetime(fd) {}
    return (sourceError, destinationError)
}

@Suite(.serialized, .tier(.linux)) struct AuthTests {
    let key = Array("0123456789abcdef-epcopy-test-key".utf8)

    @Test func enginesWithTheSameKeyTransfer() throws {
        let (s, d) = try transferWithKeys(source: key, destination: key)
        #expect(s == nil)
        #expect(d == nil)
    }

    @Test func aSourceWithoutTheKeyIsRefused() throws {
        let (s, d) = try transferWithKeys(source: nil, destination: key)
        #expect(s?.contains("requires authentication") == true, "\(s ?? "no error")")
        #expect(d != nil)
    }

    @Test func aSourceWithAnotherKeyIsRefused() throws {
        let (s, d) = try transferWithKeys(source: Array("another-key-of-16-bytes".utf8), destination: key)
        #expect(s?.contains("key does not match") == true, "\(s ?? "no error")")
        #expect(d != nil)
    }

    @Test func aSourceRefusesAnUnauthenticatedDestination() throws {
        let (s, _) = try transferWithKeys(source: key, destination: nil)
        #expect(s?.contains("did not authenticate") == true, "\(s ?? "no error")")
    }
}
