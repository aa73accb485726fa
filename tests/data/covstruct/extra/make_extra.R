# Makes glmmtmb_extra.json's numbers (glmmTMB 1.1.5, R 4.x): run in a folder holding
# sim_ar1.csv (../data) and sleepstudy.csv (hd.datasets.load("sleepstudy").to_csv).
suppressMessages(library(glmmTMB)); library(jsonlite)
cases <- list(
 list(name="ar1_disp_reml", data="sim_ar1", f="y ~ x + time + ar1(0 + timef | subj)", d="~grp", reml=TRUE),
 list(name="ar1_disp_ml", data="sim_ar1", f="y ~ x + time + ar1(0 + timef | subj)", d="~grp", reml=FALSE),
 list(name="toep_ml", data="sim_ar1", f="y ~ x + time + toep(0 + timef | subj)", d="~1", reml=FALSE),
 list(name="toep_reml", data="sim_ar1", f="y ~ x + time + toep(0 + timef | subj)", d="~1", reml=TRUE),
 list(name="cs_sim_reml", data="sim_ar1", f="y ~ x + time + cs(0 + timef | subj)", d="~1", reml=TRUE),
 list(name="us_sleep_reml", data="sleepstudy", f="Reaction ~ Days + us(Days | Subject)", d="~1", reml=TRUE),
 list(name="diag_sleep_ml", data="sleepstudy", f="Reaction ~ Days + diag(1 + Days | Subject)", d="~1", reml=FALSE),
 list(name="disp_x_ml", data="sim_ar1", f="y ~ x + (1 | subj)", d="~x", reml=FALSE),
 list(name="ar1_time_factor", data="sim_ar1", f="y ~ x + time + ar1(0 + factor(time) | subj)", d="~1", reml=TRUE)
)
out <- list()
for (cs in cases) {
  dat <- read.csv(paste0(cs$data, ".csv"), stringsAsFactors=TRUE)
  if (cs$data=="sim_ar1") dat$timef <- factor(dat$timef)
  m <- glmmTMB(as.formula(cs$f), data=dat, dispformula=as.formula(cs$d), REML=cs$reml)
  vc <- VarCorr(m)$cond
  out[[cs$name]] <- list(formula=cs$f, dispformula=cs$d, data=cs$data, reml=cs$reml,
     objective=-2*as.numeric(logLik(m)), fixef=as.list(fixef(m)$cond),
     cov=lapply(vc, function(v) unclass(v)[,]), disp=as.list(fixef(m)$disp), conv=m$fit$convergence)
}
write_json(out, "tmb.json", digits=NA, auto_unbox=TRUE)
