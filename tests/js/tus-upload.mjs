// Drives the proxy's tus endpoint with tus-js-client, as a browser app or a Node service would.
// Called by tests/tus_clients.rs; settings come as JSON in TUS_TEST_ARGS:
//   endpoint, token, file, chunkSize (null: one PATCH), parallel, uploadUrl (resume from it),
//   metadata, throttle (bytes/s per request body, to interrupt a transfer in the middle).
// Prints one JSON object per line: {event: "url" | "patch" | "success" | "error", ...}.
import fs from 'node:fs';
import { Transform } from 'node:stream';
import * as tus from 'tus-js-client';

const cfg = JSON.parse(process.env.TUS_TEST_ARGS);
const say = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

// A source reading file ranges, optionally slowed down, so a test can kill this process while
// a PATCH is in flight.
function slowReader(path, bytesPerSec) {
  const size = fs.statSync(path).size;
  return {
    openFile: async () => ({
      size,
      slice: (start, end) => {
        end = Math.min(end, size);
        let stream = fs.createReadStream(path, { start, end: Math.max(end - 1, start), highWaterMark: 256 * 1024 });
        if (end <= start) stream = fs.createReadStream(path, { start: 0, end: -1 });
        const slow = new Transform({
          transform(chunk, _enc, cb) {
            setTimeout(() => cb(null, chunk), (chunk.length / bytesPerSec) * 1000);
          },
        });
        const value = stream.pipe(slow);
        value.size = end - start;
        return Promise.resolve({ value, done: end >= size });
      },
      close: () => {},
    }),
  };
}

const options = {
  endpoint: cfg.endpoint,
  uploadUrl: cfg.uploadUrl ?? null,
  chunkSize: cfg.chunkSize ?? Infinity,
  parallelUploads: cfg.parallel ?? 1,
  headers: { Authorization: `Bearer ${cfg.token}` },
  metadata: cfg.metadata ?? {},
  retryDelays: [0, 200, 500, 1000, 2000],
  storeFingerprintForResuming: false,
  removeFingerprintOnSuccess: true,
  onUploadUrlAvailable: () => say({ event: 'url', url: upload.url }),
  onBeforeRequest: (req) => {
    if (req.getMethod() === 'PATCH') {
      say({ event: 'patch', offset: Number(req.getHeader('Upload-Offset')) });
    }
  },
  onSuccess: () => {
    say({ event: 'success', url: upload.url });
  },
  onError: (err) => {
    say({ event: 'error', message: String(err) });
    process.exit(1);
  },
};
if (cfg.throttle) {
  options.fileReader = slowReader(cfg.file, cfg.throttle);
}
const upload = new tus.Upload(fs.createReadStream(cfg.file), options);
upload.start();
