/**
 * `--influx URL`: where the metrics go. One URL names the server and the database:
 *
 *   http://127.0.0.1:8086/idlecrypt          host 127.0.0.1, port 8086, database idlecrypt
 *   https://user:pass@influx.example/metrics  credentials in the URL (never logged)
 *
 * Without a port the InfluxDB default 8086 applies (not 80/443: an InfluxDB URL without a
 * port almost always means the default InfluxDB port); without a path, database idlecrypt.
 * Bad URLs are rejected before anything starts, with a message that says what was wrong.
 */
import { IdlecryptError } from '../errors.ts';

export const DEFAULT_INFLUX_PORT = 8086;
export const DEFAULT_DATABASE = 'idlecrypt';

export interface InfluxTarget {
  readonly protocol: 'http' | 'https';
  readonly host: string;
  readonly port: number;
  readonly database: string;
  readonly username?: string;
  readonly password?: string;
  /** The URL without credentials, for logs and messages. */
  readonly display: string;
}

const EXAMPLE = 'expected http://HOST:PORT/DATABASE, e.g. http://127.0.0.1:8086/idlecrypt';

function usage(message: string, url: string): IdlecryptError {
  // The URL may hold a password: the message shows it only with the password masked.
  return new IdlecryptError('USAGE', `--influx: ${message} (${EXAMPLE})`, { context: { url: maskPassword(url) } });
}

function maskPassword(url: string): string {
  return url.replace(/^([a-z][a-z0-9+.-]*:\/\/[^/:@]*:)[^@/]*@/i, '$1***@');
}

export function parseInfluxUrl(url: string): InfluxTarget {
  const text = url.trim();
  if (text === '') throw usage('the URL is empty', url);
  if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(text)) throw usage(`'${maskPassword(text)}' is not a URL: it needs a scheme`, url);
  let u: URL;
  try {
    u = new URL(text);
  } catch {
    throw usage(`'${maskPassword(text)}' is not a valid URL`, url);
  }
  const scheme = u.protocol.replace(/:$/, '');
  if (scheme !== 'http' && scheme !== 'https') throw usage(`unsupported scheme '${scheme}': InfluxDB speaks http or https`, url);
  if (u.hostname === '') throw usage(`'${maskPassword(text)}' has no host`, url);
  if (u.search !== '' || u.hash !== '') throw usage(`'${maskPassword(text)}' has a query or fragment; put the database in the path`, url);

  // u.port is '' both when absent and when it is the scheme's default (80/443): read the
  // text itself to tell "no port" from an explicit :80.
  const explicitPort = /^[a-z]+:\/\/(?:[^@/]*@)?(?:\[[^\]]*\]|[^/:]*):(\d+)(?:\/|$)/i.exec(text)?.[1];
  const port = explicitPort === undefined ? DEFAULT_INFLUX_PORT : Number(explicitPort);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw usage(`port ${explicitPort} is out of range`, url);

  const segments = u.pathname.split('/').filter((s) => s !== '');
  if (segments.length > 1) throw usage(`'${u.pathname}' is not a database name: the path must be a single name`, url);
  const database = segments.length === 0 ? DEFAULT_DATABASE : decodeURIComponent(segments[0]!);
  if (!/^[A-Za-z0-9_.-]+$/.test(database)) throw usage(`database name '${database}' may only contain letters, digits, '_', '-' and '.'`, url);

  const username = u.username === '' ? undefined : decodeURIComponent(u.username);
  const password = u.password === '' ? undefined : decodeURIComponent(u.password);
  if (password !== undefined && username === undefined) throw usage('a password needs a user name (http://USER:PASSWORD@HOST:PORT/DATABASE)', url);
  const host = u.hostname.replace(/^\[(.*)\]$/, '$1');
  const hostForUrl = host.includes(':') ? `[${host}]` : host;
  return {
    protocol: scheme,
    host,
    port,
    database,
    ...(username !== undefined ? { username } : {}),
    ...(password !== undefined ? { password } : {}),
    display: `${scheme}://${username !== undefined ? `${username}@` : ''}${hostForUrl}:${port}/${database}`,
  };
}
