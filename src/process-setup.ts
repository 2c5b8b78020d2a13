// Process-wide settings that must be in place before anything touches the libuv thread pool.
// Disk hits and the spill files of fills are file-system work on that pool; its default of 4 threads
// queues a herd of disk hits behind each other. Imported first by main.ts.
process.env.UV_THREADPOOL_SIZE ??= '16';
