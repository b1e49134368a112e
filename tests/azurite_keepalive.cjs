// Preloaded into azurite-table (NODE_OPTIONS=--require) to hold its idle keep-alive at
// SYNCLINE_AZURITE_KEEP_ALIVE_SECONDS: its --tableKeepAliveTimeout option is never read (Azurite 3.35 reads
// flags.tableKeepAvlieTimeout), so the server gets the 5 s default, set after the server is created.
// See AZURITE_KEEP_ALIVE_SECONDS in tests/azurite.py for why the emulator must outlast the client's keep-alive.
const http = require("http");
const seconds = Number(process.env.SYNCLINE_AZURITE_KEEP_ALIVE_SECONDS || "0");
const createServer = http.createServer;
http.createServer = function (...args) {
  const server = createServer.apply(this, args);
  if (seconds > 0) {
    Object.defineProperty(server, "keepAliveTimeout", { get: () => seconds * 1000, set: () => {} });
    server.headersTimeout = seconds * 1000 + 1000; // Node wants it above the keep-alive timeout
  }
  return server;
};
