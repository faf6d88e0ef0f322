/** The QMP client: talk to a running QEMU (commands, replies, events). Knows nothing of disks. */
export { QmpClient, qmpCommandError, QMP_COMMAND_TIMEOUT_MS, QMP_CONNECT_TIMEOUT_MS, type QmpEvent, type QmpGreeting, type QmpState, type QmpConnectOptions, type QmpClientEvents } from "./qmp-client.ts";
export { QmpParser, decodeQmpLine, encodeQmpCommand, QMP_LINE_BYTES_MAX, type QmpMessage } from "./qmp-parser.ts";
