/*
 * tpm step: a TPM 2.0 behind the Command Response Buffer interface (TCG PC
 * Client Platform TPM Profile, CRB), found through the ACPI TPM2 table (start
 * method 7) and the DSDT's MSFT0101 device. Requests locality 0, readies the
 * TPM, sends TPM2_Startup(TPM_SU_CLEAR) and TPM2_GetRandom(16), then idles it
 * and gives the locality back. The copies and polling run at CPL3
 * (user_tpm_exchange); the register set-up here is a few accesses.
 */
#include "guest.h"

#define TPM2_TABLE_LEN 52
#define START_METHOD_CRB 7
/* The control area starts 0x40 into the locality's page. */
#define CRB_CONTROL_OFFSET 0x40
#define CRB_PAGE 0x1000

#define CRB_LOC_STATE 0x00
#define CRB_LOC_CTRL 0x08
#define CRB_LOC_STS 0x0c
#define CRB_INTF_ID 0x30
#define CRB_INTF_ID_HI 0x34
#define CRB_CTRL_REQ 0x40
#define CRB_CTRL_STS 0x44
#define CRB_CTRL_CMD_SIZE 0x58
#define CRB_CTRL_CMD_LADDR 0x5c
#define CRB_CTRL_CMD_HADDR 0x60
#define CRB_CTRL_RSP_SIZE 0x64
#define CRB_CTRL_RSP_ADDR 0x68

#define LOC_CTRL_REQUEST_ACCESS 1
#define LOC_CTRL_RELINQUISH 2
#define LOC_STATE_ASSIGNED 0x2
#define LOC_STS_GRANTED 0x1
#define CTRL_REQ_CMD_READY 1
#define CTRL_REQ_GO_IDLE 2
#define CTRL_STS_ERROR 0x1
#define CTRL_STS_IDLE 0x2

#define TPM_RC_SUCCESS 0x000
#define TPM_RC_INITIALIZE 0x100 /* Startup after Startup: Linux treats it as success */

static const u8 startup_clear[12] = {0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0};
static const u8 get_random_16[12] = {0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 16};
static u8 response[64];

static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }

/* Polls the register at crb + off until (value & mask) == want; false after timeout_ms. */
static bool wait_reg(u64 crb, u32 off, u32 mask, u32 want)
{
    u64 deadline = rdtsc() + ms_to_tsc(cfg.tpm_timeout_ms);
    while ((rd32(crb + off) & mask) != want) {
        if (rdtsc() > deadline)
            return false;
        cpu_relax();
    }
    return true;
}

/* One command; prints "tpm <name> rc=0x.. len=<n>" (or the failure) and returns the rc,
 * or -1 with r filled when the exchange itself failed. */
static long exchange(struct tpm_job *j, const char *name, const u8 *cmd, struct result *r)
{
    struct line l;
    j->cmd = cmd;
    j->cmd_len = 12;
    j->rsp = response;
    j->rsp_cap = sizeof(response);
    j->timeout = ms_to_tsc(cfg.tpm_timeout_ms);
    run_user(user_tpm_exchange, j);
    line_begin(&l);
    line_str(&l, "tpm ");
    line_str(&l, name);
    if (j->err == TPMX_OK && !(j->ctrl_sts & CTRL_STS_ERROR)) {
        line_str(&l, " rc=");
        line_hex(&l, be32(response + 6));
        line_str(&l, " len=");
        line_dec(&l, j->rsp_len);
    } else {
        line_str(&l, " failed ctrl_sts=");
        line_hex(&l, j->ctrl_sts);
        line_str(&l, " rsp_len=");
        line_dec(&l, j->rsp_len);
        if (j->rsp_len >= 10) {
            line_str(&l, " rc=");
            line_hex(&l, be32(response + 6));
        }
    }
    line_end(&l);
    if (j->err == TPMX_TIMEOUT) {
        res_str(r, name);
        res_str(r, ": CRB_CTRL_START still set after ");
        res_dec(r, cfg.tpm_timeout_ms);
        res_str(r, " ms");
        return -1;
    }
    if (j->err == TPMX_BAD_SIZE) {
        res_str(r, name);
        res_str(r, ": bad response size ");
        res_dec(r, j->rsp_len);
        return -1;
    }
    if (j->ctrl_sts & CTRL_STS_ERROR) {
        res_str(r, name);
        res_str(r, ": CRB_CTRL_STS.tpmSts set ctrl_sts=");
        res_hex(r, j->ctrl_sts);
        if (j->rsp_len >= 10) {
            res_str(r, " rc=");
            res_hex(r, be32(response + 6));
        }
        return -1;
    }
    return be32(response + 6);
}

bool step_tpm(struct result *r)
{
    struct hid_job h;
    struct tpm_job j;
    struct line l;
    u64 table, control, crb, rsp_addr;
    u32 len, method, cmd_size, rsp_size, loc_state, i;
    long rc;

    if (cfg.tpm_bad) {
        res_str(r, "bad tpm_timeout_ms value");
        return false;
    }
    table = acpi_find_table("TPM2", &len);
    if (!table) {
        res_str(r, "no TPM2 table");
        return false;
    }
    if (len < TPM2_TABLE_LEN) {
        res_str(r, "TPM2 table too short len=");
        res_dec(r, len);
        return false;
    }
    control = rd64(table + 40);
    method = rd32(table + 48);
    h.addr = acpi_discover()->dsdt;
    h.len = acpi_discover()->dsdt_len;
    h.found = h.crs_found = 0;
    if (h.addr)
        run_user(user_find_tpm_hid, &h);
    line_begin(&l);
    line_str(&l, "tpm table rev=");
    line_dec(&l, rd8(table + 8));
    line_str(&l, " len=");
    line_dec(&l, len);
    line_str(&l, " class=");
    line_dec(&l, rd16(table + 36));
    line_str(&l, " control=");
    line_hex(&l, control);
    line_str(&l, " start_method=");
    line_dec(&l, method);
    line_str(&l, " hid=");
    line_str(&l, h.found ? "MSFT0101" : "none");
    if (h.crs_found) {
        line_str(&l, " crs=");
        line_hex(&l, h.crs_base);
        line_str(&l, "/");
        line_hex(&l, h.crs_len);
    }
    line_end(&l);
    if (method != START_METHOD_CRB) {
        res_str(r, "TPM2 start method is not CRB: ");
        res_dec(r, method);
        return false;
    }
    crb = control - CRB_CONTROL_OFFSET;
    if (control < CRB_CONTROL_OFFSET || crb % CRB_PAGE || !map_mmio(crb, CRB_PAGE, true)) {
        res_str(r, "cannot map the CRB at ");
        res_hex(r, crb);
        return false;
    }

    cmd_size = rd32(crb + CRB_CTRL_CMD_SIZE);
    j.buf_addr = rd32(crb + CRB_CTRL_CMD_LADDR) | (u64)rd32(crb + CRB_CTRL_CMD_HADDR) << 32;
    rsp_size = rd32(crb + CRB_CTRL_RSP_SIZE);
    rsp_addr = rd32(crb + CRB_CTRL_RSP_ADDR) | (u64)rd32(crb + CRB_CTRL_RSP_ADDR + 4) << 32;
    line_begin(&l);
    line_str(&l, "tpm crb intf_id=");
    line_hex(&l, rd32(crb + CRB_INTF_ID) | (u64)rd32(crb + CRB_INTF_ID_HI) << 32);
    line_str(&l, " loc_state=");
    line_hex(&l, rd32(crb + CRB_LOC_STATE));
    line_str(&l, " ctrl_sts=");
    line_hex(&l, rd32(crb + CRB_CTRL_STS));
    line_str(&l, " cmd=");
    line_hex(&l, j.buf_addr);
    line_str(&l, "/");
    line_hex(&l, cmd_size);
    line_str(&l, " rsp=");
    line_hex(&l, rsp_addr);
    line_str(&l, "/");
    line_hex(&l, rsp_size);
    line_end(&l);
    /* One buffer for both, inside the locality's page, as the interface needs here. */
    if (rsp_addr != j.buf_addr || j.buf_addr < crb + 0x80 || cmd_size < 12 ||
        j.buf_addr + cmd_size > crb + CRB_PAGE || rsp_size != cmd_size) {
        res_str(r, "unusable command/response buffers");
        return false;
    }
    j.crb = crb;
    j.buf_size = cmd_size;

    wr32(crb + CRB_LOC_CTRL, LOC_CTRL_REQUEST_ACCESS);
    if (!wait_reg(crb, CRB_LOC_STS, LOC_STS_GRANTED, LOC_STS_GRANTED)) {
        res_str(r, "locality 0 not granted");
        return false;
    }
    loc_state = rd32(crb + CRB_LOC_STATE);
    if (!(loc_state & LOC_STATE_ASSIGNED) || (loc_state >> 2 & 7) != 0) {
        res_str(r, "locality 0 not active loc_state=");
        res_hex(r, loc_state);
        return false;
    }
    wr32(crb + CRB_CTRL_REQ, CTRL_REQ_CMD_READY);
    if (!wait_reg(crb, CRB_CTRL_REQ, CTRL_REQ_CMD_READY, 0) ||
        !wait_reg(crb, CRB_CTRL_STS, CTRL_STS_IDLE, 0)) {
        res_str(r, "the TPM did not become ready ctrl_sts=");
        res_hex(r, rd32(crb + CRB_CTRL_STS));
        return false;
    }
    line_begin(&l);
    line_str(&l, "tpm ready loc_state=");
    line_hex(&l, loc_state);
    line_str(&l, " loc_sts=");
    line_hex(&l, rd32(crb + CRB_LOC_STS));
    line_str(&l, " ctrl_sts=");
    line_hex(&l, rd32(crb + CRB_CTRL_STS));
    line_end(&l);

    rc = exchange(&j, "startup", startup_clear, r);
    if (rc < 0)
        return false;
    if (rc != TPM_RC_SUCCESS && rc != TPM_RC_INITIALIZE) {
        res_str(r, "startup rc=");
        res_hex(r, (u64)rc);
        return false;
    }
    res_kv_hex(r, "startup_rc", (u64)rc);

    rc = exchange(&j, "getrandom", get_random_16, r);
    if (rc < 0)
        return false;
    if (rc != TPM_RC_SUCCESS) {
        res_str(r, "getrandom rc=");
        res_hex(r, (u64)rc);
        return false;
    }
    /* TPM2B_DIGEST after the header: a size, then the bytes. */
    len = (u32)response[10] << 8 | response[11];
    if (len != 16 || j.rsp_len != 12 + len) {
        res_str(r, "getrandom returned ");
        res_dec(r, len);
        res_str(r, " bytes in a response of ");
        res_dec(r, j.rsp_len);
        return false;
    }
    line_begin(&l);
    line_str(&l, "tpm random bytes=16 hex=");
    for (i = 0; i < 16; i++)
        line_hexpad(&l, response[12 + i], 2);
    line_end(&l);
    res_kv_hex(r, "getrandom_rc", (u64)rc);
    res_kv_dec(r, "bytes", len);

    wr32(crb + CRB_CTRL_REQ, CTRL_REQ_GO_IDLE);
    if (!wait_reg(crb, CRB_CTRL_REQ, CTRL_REQ_GO_IDLE, 0) ||
        !wait_reg(crb, CRB_CTRL_STS, CTRL_STS_IDLE, CTRL_STS_IDLE)) {
        res_str(r, "the TPM did not go idle ctrl_sts=");
        res_hex(r, rd32(crb + CRB_CTRL_STS));
        return false;
    }
    wr32(crb + CRB_LOC_CTRL, LOC_CTRL_RELINQUISH);
    if (!wait_reg(crb, CRB_LOC_STATE, LOC_STATE_ASSIGNED, 0)) {
        res_str(r, "locality 0 still assigned after relinquish");
        return false;
    }
    line_begin(&l);
    line_str(&l, "tpm released loc_state=");
    line_hex(&l, rd32(crb + CRB_LOC_STATE));
    line_str(&l, " loc_sts=");
    line_hex(&l, rd32(crb + CRB_LOC_STS));
    line_str(&l, " ctrl_sts=");
    line_hex(&l, rd32(crb + CRB_CTRL_STS));
    line_end(&l);
    res_kv_hex(r, "control", control);
    return true;
}
