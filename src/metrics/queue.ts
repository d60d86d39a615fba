/**
 * A fixed-capacity FIFO on a ring: push and drop-oldest are O(1) and allocate nothing, so
 * a sink's write() costs the same whether InfluxDB is up or has been down for an hour.
 */
export class BoundedQueue<T> {
  private readonly slots: (T | undefined)[];
  private head = 0;
  private count = 0;

  constructor(readonly capacity: number) {
    if (!Number.isInteger(capacity) || capacity < 1) throw new RangeError(`queue capacity must be a positive integer, got ${capacity}`);
    this.slots = new Array<T | undefined>(capacity);
  }

  get length(): number {
    return this.count;
  }

  /** Appends; when full, the oldest item goes first. Returns how many were dropped (0 or 1). */
  push(item: T): number {
    let dropped = 0;
    if (this.count === this.capacity) {
      this.dropOldest();
      dropped = 1;
    }
    this.slots[(this.head + this.count) % this.capacity] = item;
    this.count++;
    return dropped;
  }

  /** Removes the oldest item; false if empty. */
  dropOldest(): boolean {
    if (this.count === 0) return false;
    this.slots[this.head] = undefined;
    this.head = (this.head + 1) % this.capacity;
    this.count--;
    return true;
  }

  /** Removes and returns up to n of the oldest items, oldest first. */
  take(n: number): T[] {
    const k = Math.min(n, this.count);
    const out = new Array<T>(k);
    for (let i = 0; i < k; i++) {
      const at = (this.head + i) % this.capacity;
      out[i] = this.slots[at] as T;
      this.slots[at] = undefined;
    }
    this.head = (this.head + k) % this.capacity;
    this.count -= k;
    return out;
  }

  /**
   * Puts items taken earlier back in front (they are older than everything queued). Beyond
   * capacity the oldest of them are dropped; returns how many.
   */
  unshift(items: readonly T[]): number {
    const room = this.capacity - this.count;
    const dropped = Math.max(0, items.length - room);
    const keep = items.slice(dropped);
    this.head = (this.head - keep.length + this.capacity * 2) % this.capacity;
    for (let i = 0; i < keep.length; i++) this.slots[(this.head + i) % this.capacity] = keep[i];
    this.count += keep.length;
    return dropped;
  }

  /** Empties the queue; returns how many items it held. */
  clear(): number {
    const n = this.count;
    this.slots.fill(undefined);
    this.head = 0;
    this.count = 0;
    return n;
  }
}
