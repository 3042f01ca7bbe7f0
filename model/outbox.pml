/*
 * outbox.pml - the commit protocol of "outbox" (RocketMQ half messages with the
 * transaction-log check-back and the guard row, the local outbox / fallback with
 * its relays, and the idempotent consumer) for the Spin model checker.
 *
 * See model/README.md for what is modelled and why; scripts/model-check runs it.
 *
 * Configuration (-D flags to spin -a / gcc):
 *   OUTBOX          local outbox adapter only (no half messages): the producer
 *                   writes business change + outbox row; two relays publish.
 *                   Default: the RocketMQ transactional adapter.
 *   NO_FALLBACK     RocketMQ adapter without fallback_to_outbox.
 *   PATIENT_BROKER  the broker's last check-back comes after the local-transaction
 *                   timeout AND after the faults have stopped (the condition under
 *                   which guard_after=None is safe). Default: the last check comes
 *                   after the timeout, but faults may still hit it.
 *   CLOCK_FIRST     the check-back reads the clock before the transaction log
 *                   (the proposed fix). Default: as implemented, log row first
 *                   (SqlAlchemyTransactionListener.check -> decide).
 *   LATE_END_IGNORED  an end-transaction COMMIT that reaches the broker after the
 *                   half message was resolved by a check-back is acknowledged but
 *                   does nothing. Default: it still delivers (RocketMQ 4.x
 *                   EndTransactionProcessor finds the prepared message by offset).
 *   SETTLE_IN_TIME  the guard row is settled only when the end-transaction was
 *                   answered within the local-transaction timeout (proposed fix).
 *   DIFFKEYS        the two transactions have different keys (default: one key).
 *   RMQ_ORDER       check per-key order in the RocketMQ model too (always
 *                   checked with OUTBOX).
 *   MAXF=n          fault budget: crashes, lost / duplicated messages (default 2).
 *   CHECKMAX=n      transactionCheckMax (default 2).
 * Mutations:
 *   NO_GUARD        (1) the local transaction writes no guard row.
 *   CHECK_UNKNOWN   (2) the check-back handler answers UNKNOWN for ever.
 *   ACK_EARLY       (3) the consumer acknowledges before its inbox transaction
 *                   commits.
 *   NO_HOLDBACK     (extra) the relay's claim ignores earlier same-key rows.
 */

#ifndef NT
#define NT 2                    /* transactions: 1 or 2 */
#endif
#ifndef RELAYS
#define RELAYS 2                /* relays: 1 or 2 */
#endif
#ifndef MAXF
#define MAXF 2
#endif
#ifndef CHECKMAX
#define CHECKMAX 2
#endif
#define MAXCP 12                /* messages the broker can hold (asserted) */

#ifdef OUTBOX
#define CHECK_ORDER
#endif
#ifdef RMQ_ORDER
#define CHECK_ORDER
#endif

#ifdef DIFFKEYS
#define KEY(t) (t)
#else
#define KEY(t) 0
#endif

#ifdef NO_GUARD
#define GUARDED 0
#else
#define GUARDED 1
#endif

/* half message at the broker */
#define H_NONE     0
#define H_HALF     1
#define H_COMMIT   2
#define H_ROLLBACK 3
#define H_DISCARD  4
/* end-transaction requests and check-back answers */
#define A_COMMIT   1
#define A_ROLLBACK 2
#define A_UNKNOWN  3
/* outbox rows */
#define R_NONE     0
#define R_PENDING  1
#define R_SENT     2
/* producer modes */
#define M_HALF     1
#define M_LOCAL    2
/* producer steps */
#define P_START    0
#define P_RUN      1
#define P_COMMIT   2
#define P_END      3
#define P_WAIT     4
#define P_SETTLE   5

/* ---- faults ---------------------------------------------------------------- */
byte faults;                    /* faults so far (crashes, losses, duplicates) */
bool calm;                      /* faults have stopped for good (PATIENT_BROKER) */
#define CANFAULT (!calm && faults < MAXF)

/* ---- the producer's database (committed state only) ------------------------ */
bool biz[NT];                   /* the business change of transaction t committed */
bool txlog[NT];                 /* its transaction-log row */
byte corder[NT];                /* commit order, 1-based; 0 = never committed */
byte ncommit;
byte orow[NT];                  /* its outbox row (guard or fallback/outbox row) */
bool odue[NT];                  /* the row is due (a guard row after guard_after) */
byte olock[NT];                 /* relay holding the row lock (0 = none) */

/* ---- time, per message (age since the message was built) ------------------- */
bool live[NT];                  /* the local transaction may still be running */
byte age[NT];                   /* 0: < timeout/2, 1: < timeout, 2: >= timeout */
bool committing[NT];            /* passed before_commit, COMMIT not yet done */

/* ---- broker ----------------------------------------------------------------- */
byte half[NT];
byte checks[NT];                /* check-backs sent */
byte endreq[NT];                /* end-transaction request in flight */
bool endtaken[NT];              /* the broker processed one: a response can come */
bool chkreq[NT];                /* check-back request in flight */
bool chkbusy[NT];               /* the handler is working on one */
byte chkans[NT];                /* check-back answer in flight */
byte ncp;                       /* messages stored for the consumer group, in order */
byte cptx[MAXCP];
bool cpack[MAXCP];

/* ---- the consumer's database ------------------------------------------------- */
bool inbox[NT];
byte applied[NT];               /* how often the handler's change committed */

inline addcopy(t) {
  assert(ncp < MAXCP);
  cptx[ncp] = t;
  ncp++
}

/* ============================================================================
 * Producer: one process, the transactions one after the other. A crash (or an
 * error that ends the call) abandons the call; the process goes on with the next.
 * Lines starting "EV" narrate a trail (spin -t); pan does not print them.
 * ========================================================================== */
inline nexttx() {
  live[i] = 0; committing[i] = 0;
  i++; pc = P_START; mode = 0; outcome = 0
}

active proctype Producer() {
  byte i = 0, pc = P_START, mode = 0, outcome = 0;
end_producer:
  do
  :: atomic { pc == P_START && i < NT ->
       live[i] = 1;
#ifdef OUTBOX
       mode = M_LOCAL; pc = P_RUN
#else
       if
       :: half[i] = H_HALF; mode = M_HALF; pc = P_RUN;    /* half message stored */
          printf("EV producer: half message %d stored at the broker\n", i)
       :: CANFAULT -> faults++;                            /* the half send fails ... */
          if
          :: half[i] = H_HALF;                             /* ... after the broker stored it */
             printf("EV FAULT half send %d: stored, but the response is lost\n", i)
          :: printf("EV FAULT half send %d: lost\n", i)
          fi;
          if
#ifndef NO_FALLBACK
          :: mode = M_LOCAL; pc = P_RUN;                   /* fallback: outbox row */
             printf("EV producer: %d falls back to an outbox row\n", i)
#endif
          :: printf("EV producer: call %d raises, nothing committed\n", i); nexttx()
          fi
       fi
#endif
     }
  /* local transaction: the function ran; it raised, or before_commit ran */
  :: atomic { pc == P_RUN ->
       if
       :: outcome = A_ROLLBACK;                            /* the function raised */
          printf("EV producer: local transaction %d rolls back (the function raised)\n", i);
          if :: mode == M_HALF -> live[i] = 0; pc = P_END :: else -> nexttx() fi
       :: mode == M_HALF && age[i] != 0 ->                 /* refuse_late_commit */
          printf("EV producer: local transaction %d rolls back (past timeout/2)\n", i);
          outcome = A_ROLLBACK; live[i] = 0; pc = P_END
       :: mode == M_HALF && age[i] == 0 -> committing[i] = 1; pc = P_COMMIT
       :: mode == M_LOCAL -> pc = P_COMMIT
       fi }
  /* COMMIT: business change, log row, guard row (or outbox row): all or nothing */
  :: atomic { pc == P_COMMIT ->
       biz[i] = 1; ncommit++; corder[i] = ncommit;
       if
       :: mode == M_HALF ->
          txlog[i] = 1;
          if
          :: GUARDED -> orow[i] = R_PENDING; odue[i] = 0;
             printf("EV producer: local transaction %d COMMITS (change, log row, guard row)\n", i)
          :: else ->
             printf("EV producer: local transaction %d COMMITS (change, log row)\n", i)
          fi;
          committing[i] = 0; live[i] = 0;
          outcome = A_COMMIT; pc = P_END
       :: else ->
          orow[i] = R_PENDING; odue[i] = 1;
          printf("EV producer: local transaction %d COMMITS (change, outbox row)\n", i);
          nexttx()
       fi }
  /* end transaction: the request goes out (the network may lose or delay it) */
  :: atomic { pc == P_END -> endreq[i] = outcome; pc = P_WAIT;
       if
       :: outcome == A_COMMIT -> printf("EV producer: end-transaction COMMIT %d sent\n", i)
       :: else -> printf("EV producer: end-transaction ROLLBACK %d sent\n", i)
       fi }
  :: atomic { pc == P_WAIT && endtaken[i] ->               /* the broker answered */
       if
#ifdef SETTLE_IN_TIME
       :: outcome == A_COMMIT && GUARDED && age[i] == 2 ->
          printf("EV producer: end-transaction %d answered after the timeout: guard row kept\n", i);
          nexttx()
       :: outcome == A_COMMIT && GUARDED && age[i] != 2 -> pc = P_SETTLE
#else
       :: outcome == A_COMMIT && GUARDED -> pc = P_SETTLE
#endif
       :: else -> nexttx()
       fi }
  :: atomic { pc == P_WAIT && !endtaken[i] ->              /* times out: check-back */
       printf("EV producer: end-transaction %d unanswered, left to the check-back\n", i);
       nexttx() }
  :: atomic { pc == P_WAIT && endtaken[i] && CANFAULT -> faults++;
       printf("EV FAULT end-transaction response %d lost\n", i); nexttx() }
  /* settle the guard row (UPDATE ... WHERE pending; waits for a relay's lock) */
  :: atomic { pc == P_SETTLE && olock[i] == 0 ->
       if
       :: orow[i] == R_PENDING -> orow[i] = R_SENT;
          printf("EV producer: guard row %d settled (the broker took the commit)\n", i)
       :: else
       fi;
       nexttx() }
  /* crash: in-memory state lost; an open local transaction rolls back */
  :: atomic { pc != P_START && CANFAULT -> faults++;
       printf("EV FAULT producer crashes during call %d (step %d)\n", i, pc); nexttx() }
  od
}

/* ============================================================================
 * Broker, one process per half message: end transaction, check-backs up to
 * CHECKMAX, then discard. Its store is durable; a broker crash is the loss of
 * what was in flight, which the network faults already cover.
 * ========================================================================== */
#ifdef PATIENT_BROKER
#define LAST_CHECK_OK(t) (age[t] == 2 && calm)
#else
#define LAST_CHECK_OK(t) (age[t] == 2)
#endif

inline resolve(t, what) {
  if
  :: half[t] == H_HALF && what == A_COMMIT -> half[t] = H_COMMIT; addcopy(t);
     printf("EV broker: half message %d committed, delivered to the consumer group\n", t)
  :: half[t] == H_HALF && what == A_ROLLBACK -> half[t] = H_ROLLBACK;
     printf("EV broker: half message %d rolled back\n", t)
  :: else -> skip
  fi
}

proctype Broker(byte t) {
end_broker:
  do
  :: atomic { endreq[t] != 0 ->
       if
#ifndef LATE_END_IGNORED
       /* the prepared message is found by its commit-log offset and put again */
       :: half[t] != H_HALF && endreq[t] == A_COMMIT -> addcopy(t);
          printf("EV broker: late end-transaction COMMIT %d, message delivered again\n", t)
#endif
       :: else -> resolve(t, endreq[t])
       fi;
       endtaken[t] = 1;
       if
       :: endreq[t] = 0
       :: CANFAULT -> faults++;                /* duplicated: it arrives again */
          printf("EV FAULT end-transaction %d duplicated\n", t)
       fi }
  :: atomic { endreq[t] != 0 && CANFAULT -> faults++; endreq[t] = 0;
       printf("EV FAULT end-transaction %d lost\n", t) }
  /* check-backs: any time while the message is half; the last one only after
     the local-transaction timeout (the broker keeps asking longer than that) */
  :: atomic { half[t] == H_HALF && !chkreq[t] && checks[t] < CHECKMAX - 1 ->
       checks[t]++; chkreq[t] = 1;
       printf("EV broker: check-back %d #%d sent (age %d)\n", t, checks[t], age[t]) }
  :: atomic { half[t] == H_HALF && !chkreq[t] && checks[t] == CHECKMAX - 1 && LAST_CHECK_OK(t) ->
       checks[t]++; chkreq[t] = 1;
       printf("EV broker: last check-back %d #%d sent (age %d)\n", t, checks[t], age[t]) }
  /* transactionCheckMax reached, the last check's exchange over: discard */
  :: atomic { half[t] == H_HALF && checks[t] == CHECKMAX && !chkreq[t] && !chkbusy[t] &&
              chkans[t] == 0 ->
       half[t] = H_DISCARD;
       printf("EV broker: half message %d DISCARDED after %d check-backs\n", t, checks[t]) }
  :: atomic { chkans[t] != 0 ->
       resolve(t, chkans[t]);
       if
       :: chkans[t] = 0
       :: CANFAULT -> faults++;                /* duplicated */
          printf("EV FAULT check-back answer %d duplicated\n", t)
       fi }
  :: atomic { chkans[t] != 0 && CANFAULT -> faults++; chkans[t] = 0;
       printf("EV FAULT check-back answer %d lost\n", t) }
  od
}

/* ============================================================================
 * Check-back handler (runs in a producer process; one per message here): answers
 * from the transaction log. Two reads, as in the code: the log row, then the
 * clock (or the clock first with CLOCK_FIRST).
 * ========================================================================== */
inline read_row() {
  row = txlog[t];
  if
  :: row -> printf("EV check-back %d: log row present\n", t)
  :: else -> printf("EV check-back %d: log row absent\n", t)
  fi
}
inline read_clock() {
  old = (age[t] == 2);
  if
  :: old -> printf("EV check-back %d: clock says past the timeout\n", t)
  :: else -> printf("EV check-back %d: clock says within the timeout\n", t)
  fi
}

proctype Checker(byte t) {
  byte pc = 0;
  bool row = 0, old = 0;
end_checker:
  do
  :: atomic { pc == 0 && chkreq[t] ->
       if
       :: chkreq[t] = 0
       :: CANFAULT -> faults++;                /* duplicated: it comes again */
          printf("EV FAULT check-back request %d duplicated\n", t)
       fi;
#ifdef CLOCK_FIRST
       read_clock();
#else
       read_row();
#endif
       chkbusy[t] = 1; pc = 1 }
  :: atomic { pc == 0 && chkreq[t] && CANFAULT -> faults++; chkreq[t] = 0;
       printf("EV FAULT check-back request %d lost\n", t) }
  :: atomic { pc == 1 ->
#ifdef CLOCK_FIRST
       read_row();
#else
       read_clock();
#endif
#ifdef CHECK_UNKNOWN
       chkans[t] = A_UNKNOWN;
#else
       if
       :: row -> chkans[t] = A_COMMIT
       :: !row && old -> chkans[t] = A_ROLLBACK
       :: else -> chkans[t] = A_UNKNOWN
       fi;
#endif
       if
       :: chkans[t] == A_COMMIT -> printf("EV check-back %d answers COMMIT\n", t)
       :: chkans[t] == A_ROLLBACK -> printf("EV check-back %d answers ROLLBACK\n", t)
       :: else -> printf("EV check-back %d answers UNKNOWN\n", t)
       fi;
       chkbusy[t] = 0; pc = 0; row = 0; old = 0 }
  :: atomic { pc == 1 && CANFAULT -> faults++; chkbusy[t] = 0; pc = 0; row = 0; old = 0;
       printf("EV FAULT check-back handler %d crashes\n", t) }
  od
}

/* ============================================================================
 * Time: a message ages while its transaction may run or it is half. The age
 * cannot pass the timeout while a COMMIT is in progress: before_commit refuses
 * after timeout/2, and a COMMIT takes less than the other half. A pending guard
 * row comes due after guard_after. With PATIENT_BROKER, faults stop once.
 * ========================================================================== */
proctype Clock(byte t) {
end_clock:
  do
  :: atomic { age[t] == 0 && (live[t] || half[t] == H_HALF) -> age[t] = 1;
       printf("EV time: message %d is past timeout/2\n", t) }
  :: atomic { age[t] == 1 && (live[t] || half[t] == H_HALF) && !committing[t] -> age[t] = 2;
       printf("EV time: message %d is past the local-transaction timeout\n", t) }
  :: atomic { orow[t] == R_PENDING && !odue[t] -> odue[t] = 1;
       printf("EV time: guard row %d is due\n", t) }
#ifdef PATIENT_BROKER
  :: atomic { t == 0 && !calm -> calm = 1; printf("EV time: no more faults from now on\n") }
#endif
  od
}

/* ============================================================================
 * Relay: claim (row locks, SKIP LOCKED, per-key hold-back), publish one by one
 * in commit order, mark sent and commit. A crash rolls back: locks released,
 * rows stay pending. A failed publish leaves the row pending (backoff is time,
 * abstracted) and holds back the rest of its key in the batch.
 * ========================================================================== */
#define CAND(x)   (orow[x] == R_PENDING && odue[x] && olock[x] == 0)
/* x waits for y: same key, y committed before x and pending, y not claimable now */
#ifdef NO_HOLDBACK
#define HELD(x,y) 0                 /* extra mutation: no per-key hold-back in the claim */
#else
#define HELD(x,y) (KEY(x) == KEY(y) && orow[y] == R_PENDING && corder[y] < corder[x] && !CAND(y))
#endif
#if NT == 2
#define OK0 (CAND(0) && !HELD(0,1))
#define OK1 (CAND(1) && !HELD(1,0))
#else
#define OK0 CAND(0)
#define OK1 0
#endif
#define KBIT(t) (1 << KEY(t))

inline relay_reset() {
  if :: olock[0] == me -> olock[0] = 0 :: else fi;
#if NT == 2
  if :: olock[1] == me -> olock[1] = 0 :: else fi;
#endif
  pc = 0; mine = 0; tried = 0; sent = 0; blk = 0; r = 0
}

proctype Relay(byte me) {
  byte pc = 0, mine = 0, tried = 0, sent = 0, blk = 0, r = 0;
end_relay:
  do
  :: atomic { pc == 0 && (OK0 || OK1) ->
       if :: OK0 -> mine = mine | 1 :: else fi;
       if :: OK1 -> mine = mine | 2 :: else fi;
       if :: mine & 1 -> olock[0] = me :: else fi;
#if NT == 2
       if :: mine & 2 -> olock[1] = me :: else fi;
#endif
       printf("EV relay %d claims rows (mask %d)\n", me, mine);
       pc = 1 }
  :: atomic { pc == 1 ->
       r = (mine & ~tried);
       if
       :: r == 0 -> pc = 2
       :: else ->
          if
          :: r == 3 -> r = (corder[0] < corder[1] -> 0 : 1)
          :: r == 1 -> r = 0
          :: r == 2 -> r = 1
          fi;
          tried = tried | (1 << r);
          if
          :: blk & KBIT(r) -> skip             /* an earlier row of the key failed */
          :: else ->
             if
             :: addcopy(r); sent = sent | (1 << r);         /* published */
                printf("EV relay %d publishes row %d\n", me, r)
             :: CANFAULT -> faults++; blk = blk | KBIT(r);  /* request lost */
                printf("EV FAULT relay %d: publish of row %d lost\n", me, r)
             :: CANFAULT -> faults++; addcopy(r);           /* stored, response lost */
                blk = blk | KBIT(r);
                printf("EV FAULT relay %d: row %d stored, response lost\n", me, r)
             fi
          fi;
          r = 0
       fi }
  :: atomic { pc == 2 ->                       /* mark sent (failed: stay pending), commit */
       printf("EV relay %d marks sent (mask %d) and commits\n", me, sent);
       if :: sent & 1 -> orow[0] = R_SENT :: else fi;
#if NT == 2
       if :: sent & 2 -> orow[1] = R_SENT :: else fi;
#endif
       relay_reset() }
  :: atomic { pc != 0 && CANFAULT -> faults++;                    /* crash: rollback */
       printf("EV FAULT relay %d crashes (step %d), its claim rolls back\n", me, pc); relay_reset() }
  od
}

/* ============================================================================
 * Consumer: fetch (a key's messages in order: the next after the previous is
 * acknowledged), inbox row + handler in one local transaction, commit, ack.
 * Unacknowledged messages are delivered again.
 * ========================================================================== */
#define BLOCKS(d,c) (d < c && !cpack[d] && KEY(cptx[d]) == KEY(cptx[c]))
#define FIRST(c) (!BLOCKS(0,c) && !BLOCKS(1,c) && !BLOCKS(2,c) && !BLOCKS(3,c) && \
                  !BLOCKS(4,c) && !BLOCKS(5,c) && !BLOCKS(6,c) && !BLOCKS(7,c) && \
                  !BLOCKS(8,c) && !BLOCKS(9,c) && !BLOCKS(10,c) && !BLOCKS(11,c))
#define DELIV(c) (c < ncp && !cpack[c] && FIRST(c))

#if defined(CHECK_ORDER) && NT == 2
/* every same-key change committed before t has been applied */
#define ORDER_OK(t) (!(KEY(t) == KEY(1-t) && corder[1-t] != 0 && corder[1-t] < corder[t]) \
                     || applied[1-t] == 1)
#else
#define ORDER_OK(t) 1
#endif

inline apply_msg() {
  t = cptx[c];
  if
  :: !inbox[t] ->
     printf("EV consumer: applying message %d (copy %d)\n", t, c);
     assert(biz[t]);                            /* never apply an uncommitted change */
     assert(ORDER_OK(t));                       /* per-key commit order */
     inbox[t] = 1; applied[t]++;
     printf("EV consumer: message %d (copy %d) APPLIED, inbox row committed\n", t, c);
     assert(applied[t] == 1)
  :: else ->                                    /* duplicate: the handler does not run */
     printf("EV consumer: copy %d of message %d is a duplicate\n", c, t)
  fi;
  t = 0
}

inline ack_msg() {
  if
  :: cpack[c] = 1; printf("EV consumer: copy %d acknowledged\n", c)
  :: CANFAULT -> faults++;                      /* ack lost: delivered again */
     printf("EV FAULT consumer: ack of copy %d lost\n", c)
  fi
}

active proctype Consumer() {
  byte pc = 0, c = 0, t = 0;
end_consumer:
  do
  :: atomic { pc == 0 && DELIV(0) -> c = 0; pc = 1 }
  :: atomic { pc == 0 && DELIV(1) -> c = 1; pc = 1 }
  :: atomic { pc == 0 && DELIV(2) -> c = 2; pc = 1 }
  :: atomic { pc == 0 && DELIV(3) -> c = 3; pc = 1 }
  :: atomic { pc == 0 && DELIV(4) -> c = 4; pc = 1 }
  :: atomic { pc == 0 && DELIV(5) -> c = 5; pc = 1 }
  :: atomic { pc == 0 && DELIV(6) -> c = 6; pc = 1 }
  :: atomic { pc == 0 && DELIV(7) -> c = 7; pc = 1 }
  :: atomic { pc == 0 && DELIV(8) -> c = 8; pc = 1 }
  :: atomic { pc == 0 && DELIV(9) -> c = 9; pc = 1 }
  :: atomic { pc == 0 && DELIV(10) -> c = 10; pc = 1 }
  :: atomic { pc == 0 && DELIV(11) -> c = 11; pc = 1 }
#ifdef ACK_EARLY
  :: atomic { pc == 1 -> ack_msg(); pc = 2 }
  :: atomic { pc == 2 -> apply_msg(); pc = 0; c = 0 }
#else
  :: atomic { pc == 1 -> apply_msg(); pc = 2 }
  :: atomic { pc == 2 -> ack_msg(); pc = 0; c = 0 }
#endif
  :: atomic { pc != 0 && CANFAULT -> faults++;                    /* crash / handler error */
       printf("EV FAULT consumer crashes holding copy %d (step %d)\n", c, pc); pc = 0; c = 0 }
  od
}

/* ============================================================================
 * When nothing can move any more (all work done, faults over): every committed
 * change was applied exactly once, and nothing else was.
 * ========================================================================== */
active proctype Settled() {
  timeout ->
#if NT == 2
  printf("EV settled: committed %d %d, applied %d %d\n", biz[0], biz[1], applied[0], applied[1]);
#else
  printf("EV settled: committed %d, applied %d\n", biz[0], applied[0]);
#endif
#if NT == 2
  assert(applied[0] == biz[0] && applied[1] == biz[1])
#else
  assert(applied[0] == biz[0])
#endif
}

init {
  atomic {
#ifndef OUTBOX
    run Broker(0); run Checker(0); run Clock(0);
#if NT == 2
    run Broker(1); run Checker(1); run Clock(1);
#endif
#endif
    run Relay(1);
#if RELAYS == 2
    run Relay(2)
#endif
  }
}
