/** What the benchmarks' SVG plots share (bench/matrix.ts, profiles.ts, moderation.ts, apps.ts). */

/** Text for an SVG element or attribute. */
export function xmlEscape(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/** Values per bin of `binS` seconds as [t, v] points at each bin's middle, split where a value is null (no data there). */
export function binnedSegments(vals: readonly (number | null)[], binS: number): [number, number][][] {
  const segs: [number, number][][] = [[]];
  vals.forEach((v, i) => (v === null ? segs.push([]) : segs.at(-1)!.push([(i + 0.5) * binS, v])));
  return segs;
}

/** A polyline through `pts` mapped by x and y, or '' for fewer than two points. */
export function polyline(pts: readonly [number, number][], x: (t: number) => number, y: (v: number) => number, colour: string, dash = ''): string {
  if (pts.length < 2) return '';
  return `<polyline points="${pts.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(' ')}" fill="none" stroke="${colour}" stroke-width="1.5"${dash ? ` stroke-dasharray="${dash}"` : ''}/>`;
}
