/** The NBD server: serve block devices to qemu, libnbd, fio and the Linux kernel. */
export { NbdServer, type NbdServerOptions, type NbdListenAddress } from "./nbd-server.ts";
export { NbdExport, type DetectZeroes, type DirtyBitmapBits, type ExportedBitmap, type NbdExportOptions } from "./nbd-export.ts";
export { NbdConnection } from "./nbd-connection.ts";
export { NbdParser, type NbdMessage, type NbdRequest } from "./nbd-parser.ts";
export { dirtyBitmapExtents, queryBlockStatus, readRuns } from "./block-status.ts";
export { loadTlsCredentials, type TlsCredentials } from "./tls-credentials.ts";
export * from "./protocol.ts";
