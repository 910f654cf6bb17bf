// The official `openai` npm package against the server: each case's result, as JSON on stdout.
// Images are written to OUT_DIR; tests/integration/clients/test_node.py checks them.
//
//   node edit_cases.mjs BASE_URL API_KEY IMAGE_1 IMAGE_2 OUT_DIR
import fs from "node:fs";
import path from "node:path";
import OpenAI, { toFile } from "openai";

const [baseURL, apiKey, first, second, outDir] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 300_000 });
// The server's extensions are ordinary body fields: the SDK sends them as form fields.
const common = { prompt: "make the sky purple", size: "64x48", num_inference_steps: 2 };

function save(name, format, b64) {
  const file = path.join(outDir, `${name}.${format}`);
  fs.writeFileSync(file, Buffer.from(b64, "base64"));
  return file;
}

function saved(name, response) {
  return {
    size: response.size,
    output_format: response.output_format,
    seeds: response.data.map((d) => d.seed ?? null),
    files: response.data.map((d, i) => save(`${name}-${i}`, response.output_format, d.b64_json)),
  };
}

const results = {};

// One image, as a stream from disk.
results.one = saved("one", await client.images.edit({
  ...common, image: fs.createReadStream(first), seed: 3,
}));

// An array of two images (sent as `image[]`), from Buffers.
results.two = saved("two", await client.images.edit({
  ...common,
  image: [
    await toFile(fs.readFileSync(first), "first.png", { type: "image/png" }),
    await toFile(fs.readFileSync(second), "second.png", { type: "image/png" }),
  ],
}));

// n: 2, with a seed: image i uses seed + i.
results.n2 = saved("n2", await client.images.edit({
  ...common, image: fs.createReadStream(first), n: 2, seed: 11,
}));

// output_format: webp.
results.webp = saved("webp", await client.images.edit({
  ...common, image: fs.createReadStream(first), output_format: "webp",
}));

// stream: true, partial_images: 2.
const stream = await client.images.edit({
  ...common, image: fs.createReadStream(first), num_inference_steps: 4,
  stream: true, partial_images: 2,
});
const events = [];
for await (const event of stream) {
  const file = save(`stream-${events.length}`, event.output_format, event.b64_json);
  events.push({ type: event.type, index: event.partial_image_index ?? null, size: event.size, file });
}
results.stream = { events };

// An error: the SDK raises the server's OpenAI error as BadRequestError.
try {
  await client.images.edit({ ...common, image: fs.createReadStream(first), size: "13x13" });
  results.error = null;
} catch (err) {
  results.error = {
    class: err.constructor.name, status: err.status, param: err.param, message: err.message,
  };
}

console.log(JSON.stringify(results));
