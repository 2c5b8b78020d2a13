// upstreamError labels what the upstream exchange raised by who raised it: the upstream's errors are
// 502/504 with their codes (known or not), cuttle's own programming errors stay ERR_INTERNAL.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { errors } from 'undici';
import { ProxyError, upstreamError } from '../../src/errors.ts';

describe('upstreamError', () => {
  it('labels by who raised the error, never by a closed list of codes', () => {
    const parser = new errors.HTTPParserError('Response does not match the HTTP/1.1 protocol (Invalid response status)');
    assert.equal(upstreamError(parser).code, 'ERR_INVALID_RESPONSE');
    assert.equal(upstreamError(Object.assign(new Error('reset'), { code: 'ECONNRESET' })).code, 'ERR_UPSTREAM_RESET');
    assert.equal(upstreamError(Object.assign(new Error('new in undici'), { code: 'UND_ERR_SOMETHING_NEW' })).code, 'ERR_UPSTREAM_RESET');
    assert.equal(upstreamError(new errors.BodyTimeoutError()).code, 'ERR_READ_TIMEOUT');
    assert.equal(upstreamError(new errors.ResponseContentLengthMismatchError()).code, 'ERR_INVALID_RESPONSE');
    // cuttle's own bugs, surfacing through the exchange
    assert.equal(upstreamError(new TypeError("Cannot read properties of undefined (reading 'x')")).code, 'ERR_INTERNAL');
    assert.equal(upstreamError(new errors.InvalidArgumentError('invalid method')).code, 'ERR_INTERNAL');
    const own = new ProxyError('ERR_DEST_DENIED', 'x');
    assert.equal(upstreamError(own), own);
  });
});
