// How a PageSet's contents are read without copying: its runs as a random-access collection of PageRange,
// and its pages one by one in order.

extension PageSet {
    /// The runs of a `PageSet` as a random-access collection of `PageRange`.
    public struct Ranges: RandomAccessCollection, Sendable {
        @usableFromInline let storage: [RawRange]

        @inlinable init(storage: [RawRange]) { self.storage = storage }

        @inlinable public var startIndex: Int { 0 }
        @inlinable public var endIndex: Int { storage.count }

        @inlinable public subscript(position: Int) -> PageRange<Unit> {
            PageRange(uncheckedLower: storage[position].lower, upper: storage[position].upper)
        }
    }

    /// The pages of a `PageSet`, in ascending order, produced lazily from its runs.
    public struct Pages: Sequence, Sendable {
        @usableFromInline let storage: [RawRange]

        @inlinable init(storage: [RawRange]) { self.storage = storage }

        @inlinable public func makeIterator() -> Iterator { Iterator(storage: storage) }

        /// Walks the runs one page at a time.
        public struct Iterator: IteratorProtocol, Sendable {
            @usableFromInline let storage: [RawRange]
            @usableFromInline var index = 0
            @usableFromInline var nextPage: UInt64

            @inlinable init(storage: [RawRange]) {
                self.storage = storage
                nextPage = storage.first?.lower ?? 0
            }

            @inlinable public mutating func next() -> Unit? {
                guard index < storage.count else {
                    return nil
                }
                let page = nextPage
                nextPage += 1
                if nextPage == storage[index].upper {
                    index += 1
                    if index < storage.count {
                        nextPage = storage[index].lower
                    }
                }
                return Unit(rawValue: page)
            }
        }
    }
}
