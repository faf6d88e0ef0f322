/**
 * Accepted sockets that read into buffers the connection chooses.
 *
 * Design notes
 * - A plain net.Socket allocates a fresh 64 KiB buffer for every read and
 *   hands it out as a 'data' chunk; the parser then copies WRITE payloads
 *   out of it. At 1 GiB/s of writes that is 16k allocations a second for the
 *   garbage collector and a second copy of every byte. net.Socket's `onread`
 *   option (a buffer chosen before each read, a callback after it) avoids
 *   both: the connection lets the kernel copy payload bytes straight into
 *   the WRITE's own buffer, and everything else lands in one shared buffer
 *   whose leftover bytes the parser copies out before the callback returns
 *   (NbdParser.release). One buffer serves every connection because each
 *   read and its callback run together on the event loop thread.
 * - `onread` exists only for sockets Node creates from options, not for the
 *   ones net.Server accepts, so the accepted socket's handle moves to a new
 *   net.Socket ({ handle, onread }, what net.Server itself does on accept).
 *   The listener is created with pauseOnConnect so no byte is read before
 *   the move. `handle` and `_handle` are Node internals, stable since Node
 *   12 but undocumented: anything unexpected (no handle, bytes already
 *   buffered, a TLS or other wrapped stream) leaves the socket as it is and
 *   the connection reads with 'data' events.
 */
import net from "node:net";

export interface DirectReader {
  /** The buffer the next read from the socket goes into. */
  nextBuffer(): Buffer;
  /** `lengthBytes` bytes arrived at the start of `buffer` (the last nextBuffer()). */
  received(lengthBytes: number, buffer: Buffer): void;
}

interface StreamHandle {
  reading?: boolean;
  readStop?(): number;
  useUserBuffer?: unknown;
}

/**
 * A socket on `socket`'s connection whose reads go to `reader`, or null
 * (with `socket` untouched) when the handle cannot be moved.
 */
export function adoptSocket(socket: net.Socket, reader: DirectReader): net.Socket | null {
  if (!(socket instanceof net.Socket) || socket.constructor !== net.Socket || socket.destroyed || socket.readableLength > 0) return null;
  const internal = socket as unknown as { _handle?: StreamHandle | null };
  const handle = internal._handle;
  if (handle === null || handle === undefined || typeof handle.useUserBuffer !== "function" || typeof handle.readStop !== "function") return null;
  if (handle.reading) {
    handle.readStop();
    handle.reading = false;
  }
  internal._handle = null;
  // Without a handle, destroy() only settles the old object (and the server's connection count).
  socket.destroy();
  const options = {
    handle,
    allowHalfOpen: true,
    readable: true,
    writable: true,
    onread: {
      buffer: () => reader.nextBuffer(),
      callback: (lengthBytes: number, buffer: Uint8Array): void => reader.received(lengthBytes, buffer as Buffer),
    },
  };
  return new net.Socket(options as unknown as net.SocketConstructorOpts);
}
