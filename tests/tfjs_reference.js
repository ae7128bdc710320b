// Where test_mobileface.py's TFJS_TEXT came from: MobileFace's graph run by TF.js itself.
//
//   npm install @tensorflow/tfjs@4.22.0        (in a scratch folder; its CPU backend, no native code)
//   python -c "import numpy as np, skimage.data; a = skimage.data.astronaut()[51:163, 168:280];
//              np.stack([a, a[:, ::-1]]).astype(np.float32).tofile('faces.f32')"
//   NODE_PATH=node_modules node tfjs_reference.js data/models/mobileface faces.f32 2 out [nodes...]
//
// Writes out.<i>.f32 (float32, row-major) for the graph's output or for each node named.
const fs = require('fs');
const tf = require('@tensorflow/tfjs');

async function main() {
  const [folder, input, count, out, ...names] = process.argv.slice(2);
  await tf.setBackend('cpu');
  const graph = JSON.parse(fs.readFileSync(`${folder}/mobileface.json`));
  const bin = fs.readFileSync(`${folder}/mobileface.bin`);
  const model = await tf.loadGraphModel(tf.io.fromMemory({
    modelTopology: graph.modelTopology,
    format: graph.format,
    signature: graph.signature,
    weightSpecs: graph.weightsManifest[0].weights,
    weightData: bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.length),
  }));
  const raw = fs.readFileSync(input);
  const pixels = new Float32Array(raw.buffer, raw.byteOffset, raw.length / 4);
  const x = tf.tensor4d(pixels, [Number(count), 112, 112, 3]);
  const outputs = names.length ? names : ['batchnorm0/add_1'];
  const results = [].concat(model.execute({ data: x }, outputs));
  results.forEach((tensor, i) => {
    fs.writeFileSync(`${out}.${i}.f32`, Buffer.from(tensor.dataSync().buffer));
    console.log(outputs[i], JSON.stringify(tensor.shape));
  });
}

main();
