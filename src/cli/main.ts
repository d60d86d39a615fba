/** Entry point of the `idlecrypt` command (bin/idlecrypt). */
import { main } from './program.ts';

// Exit explicitly: a failed run may leave a timer or socket behind, and an operator's
// shell must get its prompt back. stdout/stderr are synchronous for files and pipes on Linux.
process.exit(await main(process.argv));
