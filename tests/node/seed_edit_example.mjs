// The product page's JavaScript edit example, unchanged but for the base URL and key (and a b64 check added).
// Usage: node seed_edit_example.mjs BASE_URL SOURCE_PNG
import OpenAI from 'openai';
import fs from 'fs';

const [baseURL, source] = process.argv.slice(2);
const client = new OpenAI({
  apiKey: 'YOUR_API_KEY',
  baseURL: baseURL
});
const response = await client.images.edit({
  model: 'flux.2-flex',
  image: fs.createReadStream(source),
  prompt: 'Add a starry night sky to this image',
  size: '1024x1024'
});
// { created: 1234567890, data: [{ url: "https://...", revised_prompt: "..." }] }
console.log(response.data[0].url);

// Several references as uploads, b64 output, non-OpenAI fields passed through the SDK's body.
const files = await Promise.all([source, source].map((path) => OpenAI.toFile(fs.createReadStream(path))));
const second = await client.images.edit({
  model: 'flux.2-flex', image: files, prompt: 'Combine them', size: '64x64', response_format: 'b64_json',
  // @ts-ignore: FLUX.2 fields beyond OpenAI's
  seed: 5, num_inference_steps: 2,
});
console.log(JSON.stringify({ size: second.size, seed: second.data[0].seed, b64: second.data[0].b64_json.length }));
