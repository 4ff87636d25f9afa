// Routing test function: the same bundle runs on the device and on the platform; flag files in
// the installed function directory make one place misbehave while the other stays healthy.
const fs = require('fs');
const path = require('path');

const dir = process.env.EDGEFN_FUNCTION_DIR;
const flag = (name) => fs.existsSync(path.join(dir, name));

exports.handler = async (event) => {
  if (flag('crash')) process.exit(3);
  if (flag('slow')) await new Promise((resolve) => setTimeout(resolve, 3000));
  if (flag('throw')) throw new Error('function says no');
  const body = Buffer.isBuffer(event) ? event : Buffer.from(JSON.stringify(event));
  return Buffer.concat([Buffer.from('echo:'), body]);
};
