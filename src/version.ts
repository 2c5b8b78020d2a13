// cuttle's version: in the Via header, /status, SNMP and --version. Its own module so that the request
// path names it without importing the config.
export const VERSION = '0.1.0';
