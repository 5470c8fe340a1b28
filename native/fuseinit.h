#ifndef ZFSREP_FUSEINIT_H
#define ZFSREP_FUSEINIT_H
/* Install the INIT-reply hook on the session pyfuse3.init() created: 0 on success. */
int zf_install(void);
/* 1 once the kernel accepted FUSE_HANDLE_KILLPRIV_V2 (after the INIT exchange). */
int zf_killpriv_v2(void);
#endif
