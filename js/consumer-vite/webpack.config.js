// webpack 5 build of the same app (scripts/test-consumer): the package needs
// nothing here; webpack emits the .wasm the package references with
// `new URL(..., import.meta.url)` as an asset by itself. The rest is the
// app's own: its entry, and its page (index.html is Vite's, whose script tag
// points at the source, so this build writes its own copy).
import fs from "node:fs";
import path from "node:path";

const html = fs.readFileSync(new URL("./index.html", import.meta.url), "utf8")
  .replace('<script type="module" src="/src/main.js"></script>', '<script src="main.js"></script>');

export default {
  mode: "production",
  entry: "./src/main.js",
  output: { path: path.resolve(process.env.WEBPACK_OUT_DIR ?? "dist-webpack"), clean: true },
  plugins: [
    {
      apply(compiler) {
        compiler.hooks.thisCompilation.tap("index.html", (compilation) => {
          compilation.hooks.processAssets.tap("index.html", () => {
            compilation.emitAsset("index.html", new compiler.webpack.sources.RawSource(html));
          });
        });
      },
    },
  ],
};
